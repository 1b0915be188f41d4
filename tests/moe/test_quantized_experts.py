"""Quantized routed experts (`LLM(experts="int8" | "int4")`, `--experts`): packed at load, computed by the fused
CPU kernel on device="cpu", kept in a disk cache of packed layers.

Accuracy bounds, on tiny checkpoints with trained-like weight scales (N(0, 1/fan_in)), fp32 compute, 4 prompts of
32 tokens; relative error = ||logits_q - logits|| / ||logits|| (Frobenius, per prompt), agreement = share of
positions whose top-1 token is the same:
- against the unquantized model: int8 (per output channel) error < 0.05 and agreement >= 0.9 (measured: Mixtral
  <= 0.012 / >= 0.97, Qwen3-MoE <= 0.023 / >= 0.97); int4 (groups of 64) error < 0.35 and agreement >= 0.55
  (measured: Mixtral <= 0.19 / >= 0.72, Qwen3-MoE <= 0.12 / >= 0.69). Gaussian weights lose ~9% to int4 at
  group 64 (0.6% to int8), and tiny random models amplify it through routing flips: these bounds say "close to
  the model"; the next one says "computes what it stores";
- the packed model's logits equal the plain path's on the dequantized weights within 1e-4 relative when the
  vector kernel computes every expert (measured <= 4.2e-6); by default experts with 32+ tokens go to torch.mm in
  bf16 where the CPU has bf16 dot products (measured <= 1.8e-3 here).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from cadenza import LLM, CadenzaError, SamplingParams
from cadenza.checkpoint import Checkpoint
from cadenza.kernels import cpu_moe, layout, pack
from cadenza.loader import build_meta, expert_tensor_names, model_sizes, moe_layers
from cadenza.moe import packed_store
from cadenza.moe.experts import Experts
from cadenza.moe.placement import plan
from cadenza.moe.quantize import Progress
from tests.cli.test_cli import cli
from tests.conftest import edit_config, prompt_ids, save_hf_model, tiny_mixtral_config

EXACT = 1e-4
BOUNDS = {"int8": (0.05, 0.9), "int4": (0.35, 0.55)}  # (relative logit error <, top-1 agreement >=)
PROMPTS = [prompt_ids(32, seed=s) for s in range(4)]


def _fan_in_init(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, p.shape[-1] ** -0.5)


def make_mixtral(path: Path, **overrides) -> Path:
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    kw = dict(hidden_size=128, intermediate_size=256) | overrides
    model = MixtralForCausalLM(tiny_mixtral_config(**kw)).eval()
    _fan_in_init(model)
    return save_hf_model(model, path)


def make_qwen3(path: Path) -> Path:
    from transformers import Qwen3MoeForCausalLM

    from tests.models.test_qwen3_moe import tiny_qwen3_moe_config

    torch.manual_seed(1)
    cfg = tiny_qwen3_moe_config(hidden_size=128, moe_intermediate_size=128, head_dim=32, num_experts=8)
    model = Qwen3MoeForCausalLM(cfg).eval()
    _fan_in_init(model)
    return save_hf_model(model, path)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return make_mixtral(tmp_path_factory.mktemp("qmixtral"))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return make_qwen3(tmp_path_factory.mktemp("qqwen3"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of the test's own (subprocesses inherit it)."""
    cpu_moe.available()  # the kernel builds (or not) once per process, before any test moves the cache
    monkeypatch.setenv("CADENZA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entries(cache: Path) -> list[Path]:
    root = cache / "experts"
    return sorted(p for p in root.iterdir()) if root.exists() else []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class ReadLog:
    """Records the checkpoint tensors a load reads."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        original = Checkpoint.iter_tensors

        def iter_tensors(ckpt, names=None):
            for name, t in original(ckpt, names):
                self.names.append(name)
                yield name, t

        monkeypatch.setattr(Checkpoint, "iter_tensors", iter_tensors)


def experts_read(log: ReadLog, path: Path) -> set[str]:
    return set(log.names) & expert_tensor_names(build_meta(Checkpoint(path)))


# --- the layout: fast packing gives the reference's bytes; sizes without packing --------------------------------


def reference_pack(gate, up, down, fmt, group=None) -> layout.PackedExperts:
    """The layout spelled out: each padded matrix through `_tile_into` (`_quantize_rows`' arithmetic) in one go."""
    group = layout.resolve_group(fmt, group)
    e, (i, h) = len(gate), tuple(gate[0].shape)
    out = layout.empty_packed(fmt, group, e, h, i)
    hp, ip = out.hidden_pad, out.inter_pad
    for x in range(e):
        g, u = layout._padded(gate[x], ip, hp), layout._padded(up[x], ip, hp)
        rows = torch.stack([g.view(-1, 2, hp), u.view(-1, 2, hp)], dim=1).view(-1, hp)
        layout._tile_into(out.gate_up[x], rows, fmt, group)
        layout._tile_into(out.down[x], layout._padded(down[x], hp, ip), fmt, group)
    return out


FORMATS = [("bf16", None), ("int8", 0), ("int8", 32), ("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)]


@pytest.mark.parametrize("shape", [(3, 97, 33), (2, 256, 512), (2, 130, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["native", "torch"])
def test_pack_layer_equals_reference_bytes(shape, dtype, path, monkeypatch):
    """Both packers (pack.cpp for fp32 / bf16 sources, the chunked torch ops otherwise) write the reference's bytes."""
    e, h, i = shape
    g = torch.Generator().manual_seed(7)
    gate, up, down = (torch.randn(e, *s, generator=g).to(dtype) for s in ((i, h), (i, h), (h, i)))
    gate[0, :2] = 0.0  # all-zero rows (scale 0) and negative zeros
    gate[0, 1] = -0.0
    down[-1, :, :5] = -0.0
    up[-1, 3] = -up[-1, 3].abs()  # an all-negative row
    # rounding ties: a scale of exactly 1 (int8: a 127 in the row; int4: 15 and no negative in the group) and halves
    down[0, 1] = 0.0
    down[0, 1, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5])
    up[0, 0] = 0.0
    up[0, 0, :5] = torch.tensor([15.0, 0.5, 1.5, 2.5, 3.5])
    if path == "native":
        assert pack.takes("int4", [gate[0]]), pack._library.reason
    else:
        monkeypatch.setattr(pack, "takes", lambda fmt, matrices: False)
        monkeypatch.setattr(layout, "_CHUNK_ELEMENTS", 4096)  # many chunks, odd remainders
    for fmt, group in FORMATS:
        want = reference_pack(gate, up, down, fmt, group)
        for threads in (1, 3):
            got = layout.pack_layer(gate, up, down, fmt, group, threads=threads)
            assert torch.equal(got.gate_up, want.gate_up) and torch.equal(got.down, want.down), (fmt, group, threads)
    # per-expert matrices (a loader's views into its reads), one of them a row-strided view
    wide = torch.zeros(i, h + 5, dtype=dtype)
    wide[:, :h] = gate[1]
    listed = layout.pack_layer([gate[0], wide[:, :h], *gate[2:]], list(up), list(down), "int4", 64, threads=2)
    want = reference_pack(gate, up, down, "int4", 64)
    assert torch.equal(listed.gate_up, want.gate_up) and torch.equal(listed.down, want.down)


def test_pack_cpp_declines_what_it_does_not_read():
    m = torch.zeros(4, 128)
    assert not pack.takes("int4", [m.half()])  # fp16: the torch path
    assert not pack.takes("int4", [m.t()])  # columns not contiguous
    assert not pack.takes("q4_k", [m])  # block formats come from GGUF files (repack.cpp)
    half = layout.pack_layer(m[None].half().expand(1, 4, 128), m[None].half().expand(1, 4, 128),
                             m.t()[None].half().contiguous(), "int4", 64)  # fmt: skip
    assert torch.equal(half.gate_up, layout.pack_layer(m[None], m[None], m.t()[None].contiguous(), "int4", 64).gate_up)


@pytest.mark.parametrize("shape", [(3, 97, 33), (8, 4096, 14336), (128, 2048, 768), (64, 2048, 1408)])
def test_expert_nbytes_without_packing(shape):
    e, h, i = shape
    for fmt, group in FORMATS:
        n = layout.expert_nbytes(fmt, group, h, i)
        if e * h * i <= 1 << 20:
            assert n == layout.pack_layer(*layout_weights(e, h, i), fmt, group).expert_bytes
        assert n == layout.empty_packed(fmt, group, e, h, i).expert_bytes
    assert layout.expert_nbytes("int8", None, 4096, 14336) / (3 * 4096 * 14336 * 2) == pytest.approx(0.502, abs=1e-3)
    assert layout.expert_nbytes("int4", None, 4096, 14336) / (3 * 4096 * 14336 * 2) == pytest.approx(0.273, abs=1e-3)
    with pytest.raises(ValueError, match="group 16"):
        layout.expert_nbytes("int4", 16, 64, 64)


def layout_weights(e, h, i):
    return torch.randn(e, i, h), torch.randn(e, i, h), torch.randn(e, h, i)


# --- the model: close to the unquantized one, exactly what it stores --------------------------------------------


def holding(path: Path, quant: LLM) -> LLM:
    """The unquantized model with the weights `quant`'s packed layers really hold, on the plain path."""
    held = LLM(path, device="cpu", dtype="float32")
    for plain, packed in zip(moe_layers(held.model), moe_layers(quant.model), strict=True):
        for w, deq in zip((plain.gate, plain.up, plain.down), layout.dequantize(packed.packed), strict=True):
            w.data.copy_(deq)
    return held


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3"])
def test_logits_close_to_unquantized(request, family, fmt, monkeypatch):
    path = request.getfixturevalue(family)
    exact = LLM(path, device="cpu", dtype="float32")
    quant = LLM(path, device="cpu", dtype="float32", experts=fmt)
    assert all(m.expert_format == fmt and m.packed is not None for m in moe_layers(quant.model))
    max_bound, min_agree = BOUNDS[fmt]
    for ids in PROMPTS:
        ref, got = exact.score(ids), quant.score(ids)
        err, agree = rel(got, ref), (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert err < max_bound and agree >= min_agree, (family, fmt, err, agree)
    # what it stores, computed exactly: the vector kernel for every expert (the default hands experts with 32+
    # tokens to torch.mm in bf16 where the CPU has bf16 dot products: within 2e-2 of it, see test_cpu_kernel)
    held = holding(path, quant)
    monkeypatch.setattr(cpu_moe, "default_mm_min_tokens", lambda: None)
    for ids in PROMPTS:
        assert rel(quant.score(ids), held.score(ids)) < EXACT


def test_packed_layer_storage(mixtral):
    llm = LLM(mixtral, device="cpu", dtype="float32", experts="int4", expert_group=32)
    m = moe_layers(llm.model)[0]
    assert (m.expert_format, m.packed.group) == ("int4", 32)
    assert m.expert_nbytes == m.packed.expert_bytes == layout.expert_nbytes("int4", 32, 128, 256)
    gu, dn = m.host_weights(1)
    assert gu.dtype == torch.uint8 and torch.equal(gu, m.packed.gate_up[1]) and torch.equal(dn, m.packed.down[1])
    # the stacked parameters hold no memory any more: meta tensors of the same shapes
    assert m.gate.is_meta and m.up.is_meta and m.down.is_meta and m.gate.shape == (4, 256, 128)
    assert m.num_parameters == 3 * 4 * 128 * 256
    plain = moe_layers(LLM(mixtral, device="cpu", dtype="float32").model)[0]
    assert plain.expert_format == "bf16" and plain.expert_nbytes == 3 * 128 * 256 * 4
    assert [t.shape for t in plain.host_weights(0)] == [(256, 128), (256, 128), (128, 256)]
    with pytest.raises(CadenzaError, match="packed as int4 in host memory"):
        m(torch.zeros(2, 128, device="meta"), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))


def test_quantize_in_place(mixtral):
    """`Experts.quantize` on a loaded layer: the same bytes as pack_layer, the stacks dropped."""
    llm = LLM(mixtral, device="cpu", dtype="float32")
    m = moe_layers(llm.model)[1]
    want = layout.pack_layer(m.gate, m.up, m.down, "int8")
    x = torch.randn(5, 128)
    ids, w = torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    m.quantize("int8", threads=2)
    assert torch.equal(m.packed.gate_up, want.gate_up) and m.gate.is_meta
    y = m(x, ids, w)
    ref = cpu_moe.moe_forward(want, x, ids, w, None, "silu", route="torch")
    assert rel(y, ref) < 1e-4
    with pytest.raises(ValueError, match="already packed"):
        m.quantize("int4")


def test_greedy_generation(mixtral):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    quant = LLM(mixtral, device="cpu", dtype="float32", experts="int4")
    out = quant.generate("Hello there", params)
    assert len(out.token_ids) == 16 and out.finish_reason == "length"
    held = holding(mixtral, quant)
    assert held.generate("Hello there", params).token_ids == out.token_ids
    batch = quant.generate(["Hello there", "Once"], params)  # batched greedy = one at a time
    assert batch[0].token_ids == out.token_ids


def test_planner_counts_the_stored_bytes(mixtral):
    h, i, e, layers = 128, 256, 4, 2
    for fmt, group, want in (
        ("bf16", None, 3 * h * i * 4),
        ("int8", None, layout.expert_nbytes("int8", 0, h, i)),
        ("int8", 32, layout.expert_nbytes("int8", 32, h, i)),
        ("int4", None, layout.expert_nbytes("int4", 64, h, i)),
        ("int4", 128, layout.expert_nbytes("int4", 128, h, i)),
    ):
        llm = LLM(mixtral, device="cpu", dtype="float32", experts=fmt, expert_group=group, expert_cache=False)
        assert llm.sizes.expert_bytes == want, fmt
        assert sum(m.expert_nbytes for m in moe_layers(llm.model)) == layers * want
        # a budget holds as many more of them as they are smaller
        always = llm.sizes.always_bytes
        placed = plan(llm.sizes, always + 5 * want, 0, 0, fetch_slots=0)
        assert placed.expert_bytes == want and placed.resident_count == 5
    meta = build_meta(Checkpoint(mixtral))
    assert model_sizes(meta, torch.bfloat16).expert_bytes == 3 * h * i * 2
    assert model_sizes(meta, torch.bfloat16, "int4").expert_bytes == layout.expert_nbytes("int4", 64, h, i)
    assert model_sizes(meta, torch.bfloat16, "int4").num_experts == e


def test_bad_values_are_refused(mixtral):
    for kw, match in (
        ({"experts": "fp8"}, "bf16.*int8 or int4"),
        ({"experts": "int4", "expert_group": 16}, "expert_group=16 is not supported for int4.*32, 64, 128"),
        ({"experts": "int8", "expert_group": 64 + 1}, "not supported for int8.*0 \\(per output channel\\)"),
        ({"experts": "bf16", "expert_group": 64}, "applies to quantized experts only"),
        ({"experts": "int4", "expert_group": "64"}, "whole number"),
        ({"experts": "int4", "expert_cache": "yes"}, "True or False"),
    ):
        with pytest.raises(CadenzaError, match=match):
            LLM(mixtral, device="cpu", **kw)


def test_loading_keeps_at_most_two_plain_layers(tmp_path, monkeypatch):
    path = make_mixtral(tmp_path / "deep", num_hidden_layers=5)
    seen = []
    original = Experts.quantize

    def quantize(self, *args, **kw):
        layers = [m for m in model_holder if isinstance(m, Experts)]
        seen.append(sum(1 for m in layers if m.packed is None and not m.gate.is_meta))
        original(self, *args, **kw)

    model_holder: list = []
    build = build_meta

    def build_meta_spy(ckpt):
        model = build(ckpt)
        model_holder.extend(model.modules())
        return model

    monkeypatch.setattr("cadenza.llm.build_meta", build_meta_spy)
    monkeypatch.setattr(Experts, "quantize", quantize)
    LLM(path, device="cpu", dtype="float32", experts="int8", expert_cache=False)
    assert len(seen) == 5 and max(seen) <= 2, seen


def test_synthetic_checkpoint_is_packed_and_never_cached(cache):
    from cadenza.bench.synthetic import SyntheticCheckpoint

    llm = LLM(checkpoint=SyntheticCheckpoint("mixtral-tiny"), device="cpu", experts="int8")
    assert all(m.expert_format == "int8" for m in moe_layers(llm.model))
    out = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4
    assert entries(cache) == []


def test_progress_line():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    plain = io.StringIO()
    p = Progress("quantizing routed experts to int4", 32, after_s=0.0, stream=plain)
    for i in range(1, 33):
        p.update(i)
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("cadenza: quantizing routed experts to int4: layer 1/32")
    assert lines[-1].startswith("cadenza: quantizing routed experts to int4: layer 32/32") and len(lines) == 11
    tty = Tty()  # a terminal: a bar (tqdm's), redrawn in place and ended with a newline
    p = Progress("x", 3, after_s=0.0, stream=tty)
    for i in range(1, 4):
        p.update(i, note=", 5 MB")
    text = tty.getvalue()
    assert text.count("\r") >= 3 and text.endswith("\n") and "cadenza: x" in text and "3/3" in text
    assert "5 MB" in text and "\n" not in text[:-1]
    quiet = io.StringIO()
    p = Progress("x", 3, after_s=60.0, stream=quiet)
    for i in range(1, 4):
        p.update(i)
    assert quiet.getvalue() == ""  # quick work prints nothing


# --- the disk cache ------------------------------------------------------------------------------------------------


def test_cache_is_reused_without_reading_expert_tensors(mixtral, cache, monkeypatch):
    first = LLM(mixtral, device="cpu", dtype="float32", experts="int4")
    (entry,) = entries(cache)
    assert sorted(p.name for p in entry.iterdir()) == ["layer-000.bin", "layer-001.bin", "meta.json"]
    meta = json.loads((entry / "meta.json").read_text())
    assert (meta["format"], meta["group"], meta["layers"]) == ("int4", 64, 2)
    log = ReadLog(monkeypatch)
    second = LLM(mixtral, device="cpu", dtype="float32", experts="int4")
    assert log.names and not experts_read(log, mixtral)  # the other tensors, not one expert's
    for ids in PROMPTS[:2]:
        assert torch.equal(first.score(ids), second.score(ids))
    for a, b in zip(moe_layers(first.model), moe_layers(second.model), strict=True):
        assert torch.equal(a.packed.gate_up, b.packed.gate_up) and torch.equal(a.packed.down, b.packed.down)
    # another format or group is another entry; both stay
    LLM(mixtral, device="cpu", dtype="float32", experts="int4", expert_group=32)
    assert len(entries(cache)) == 2


def test_cache_invalidated_by_a_changed_checkpoint(tmp_path, cache, monkeypatch):
    path = make_mixtral(tmp_path / "changing")
    LLM(path, device="cpu", dtype="float32", experts="int8")
    (old,) = entries(cache)
    shard = path / "model.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: maybe rewritten
    log = ReadLog(monkeypatch)
    LLM(path, device="cpu", dtype="float32", experts="int8")
    assert experts_read(log, path)  # packed again from the checkpoint
    (new,) = entries(cache)  # the stale entry of this folder is gone
    assert new != old
    log.names.clear()
    edit_config(path, cadenza_test_note="a config change")
    LLM(path, device="cpu", dtype="float32", experts="int8")
    assert experts_read(log, path)
    (newer,) = entries(cache)
    assert newer not in (old, new)
    log.names.clear()
    LLM(path, device="cpu", dtype="float32", experts="int8")
    assert not experts_read(log, path)


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_corrupt_cache_is_reported_and_rebuilt(mixtral, cache, monkeypatch, capfd, damage):
    first = LLM(mixtral, device="cpu", dtype="float32", experts="int8")
    want = first.score(PROMPTS[0])
    (entry,) = entries(cache)
    layer = entry / "layer-001.bin"
    if damage == "flip":
        data = bytearray(layer.read_bytes())
        data[len(data) // 2] ^= 0xFF
        data[-3] ^= 0x10
        layer.write_bytes(bytes(data))
    elif damage == "truncate":
        with open(layer, "r+b") as f:
            f.truncate(layer.stat().st_size - 100)
    else:
        (entry / "meta.json").write_text("{not json")
    capfd.readouterr()
    log = ReadLog(monkeypatch)
    again = LLM(mixtral, device="cpu", dtype="float32", experts="int8")
    err = capfd.readouterr().err
    notices = [line for line in err.splitlines() if "packed-expert cache" in line]
    assert len(notices) == 1, err
    expect = {"flip": "checksum mismatch", "truncate": "truncated", "meta": "meta.json is not valid JSON"}[damage]
    assert expect in notices[0] and "deleting it and packing the experts again" in notices[0]
    assert experts_read(log, mixtral)  # rebuilt from the checkpoint
    assert torch.equal(again.score(PROMPTS[0]), want)
    log.names.clear()
    LLM(mixtral, device="cpu", dtype="float32", experts="int8")  # the rebuilt entry is whole
    assert not experts_read(log, mixtral)
    assert "packed-expert cache" not in capfd.readouterr().err


def test_header_that_does_not_fit_the_model_is_refused(mixtral, cache, capfd):
    LLM(mixtral, device="cpu", dtype="float32", experts="int8")
    (entry,) = entries(cache)
    layer = entry / "layer-000.bin"
    data = layer.read_bytes()
    start = len(packed_store.MAGIC) + 8
    n = int.from_bytes(data[len(packed_store.MAGIC) : start], "little")
    header = json.loads(data[start : start + n])
    header["num_experts"] = 5
    raw = json.dumps(header).encode().ljust(n)
    layer.write_bytes(data[:start] + raw + data[start + n :])
    capfd.readouterr()
    LLM(mixtral, device="cpu", dtype="float32", experts="int8")
    assert "layer-000.bin's num_experts is 5, the model needs 4" in capfd.readouterr().err


def test_no_cache_neither_reads_nor_writes(mixtral, cache, monkeypatch):
    LLM(mixtral, device="cpu", dtype="float32", experts="int4", expert_cache=False)
    assert entries(cache) == []
    LLM(mixtral, device="cpu", dtype="float32", experts="int4")
    (entry,) = entries(cache)
    stamp = (entry / "meta.json").stat().st_mtime_ns
    log = ReadLog(monkeypatch)
    LLM(mixtral, device="cpu", dtype="float32", experts="int4", expert_cache=False)
    assert experts_read(log, mixtral)  # not from the cache
    assert entries(cache) == [entry] and (entry / "meta.json").stat().st_mtime_ns == stamp


def test_unwritable_cache_still_loads(mixtral, tmp_path, monkeypatch, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CADENZA_CACHE", str(blocker / "cache"))
    want = LLM(mixtral, device="cpu", dtype="float32", experts="int8", expert_cache=False).score(PROMPTS[0])
    capfd.readouterr()
    llm = LLM(mixtral, device="cpu", dtype="float32", experts="int8")
    err = capfd.readouterr().err
    assert "cannot write the packed-expert cache" in err and "loading without it" in err
    assert torch.equal(llm.score(PROMPTS[0]), want)


def test_disk_full_still_loads(mixtral, cache, monkeypatch, capfd):
    calls = []

    def full(path, packed, pool):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packed_store, "write_layer", full)
    capfd.readouterr()
    llm = LLM(mixtral, device="cpu", dtype="float32", experts="int8")
    err = capfd.readouterr().err
    assert len(calls) == 1  # the first failure stops the writing
    assert [line for line in err.splitlines() if "cadenza:" in line] == [
        f"cadenza: cannot write the packed-expert cache in {cache / 'experts'} (No space left on device); "
        "loading without it."
    ]
    assert entries(cache) == []  # no entry, no temporary folder left
    assert all(m.expert_format == "int8" for m in moe_layers(llm.model))


# --- the CLI -------------------------------------------------------------------------------------------------------


def test_cli_run_int4_on_the_demo_model(cache):
    args = ("run", "--experts", "int4", "--device", "cpu", "--prompt", "Hello", "--max-tokens", "8",
            "--temperature", "0", "--ignore-eos", "--json")  # fmt: skip
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["token_ids"]
    assert len(entries(cache)) == 1  # the demo model's packed experts
    assert "kept the int4 experts in the disk cache for later loads: " in r.stderr
    assert str(entries(cache)[0]) in r.stderr
    want = LLM(None, device="cpu", experts="int4").generate(
        "Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )
    assert got == want.token_ids
    again = cli(*args, "--no-cache")
    assert again.returncode == 0 and json.loads(again.stdout)["token_ids"] == got
    assert "disk cache" not in again.stderr


def test_cli_flags(mixtral):
    r = cli("info", "--model", str(mixtral), "--experts", "int4", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["experts_format"], d["expert_group"]) == ("int4", 64)
    assert d["expert_bytes"] == layout.expert_nbytes("int4", 64, 128, 256)
    assert d["routed_expert_bytes"] == 2 * 4 * d["expert_bytes"]
    text = cli("info", "--model", str(mixtral), "--experts", "int8", "--expert-group", "32").stdout
    assert "as int8 (scales groups of 32)" in text
    plain = json.loads(cli("info", "--model", str(mixtral), "--json").stdout)
    assert plain["experts_format"] == "bf16" and plain["expert_bytes"] == 3 * 128 * 256 * 4  # fp32 checkpoint
    bad = cli("run", "--model", str(mixtral), "--prompt", "x", "--experts", "int4", "--expert-group", "16")
    assert bad.returncode == 2 and "--expert-group 16 is not supported with --experts int4" in bad.stderr
    bad = cli("run", "--model", str(mixtral), "--prompt", "x", "--experts", "fp8")
    assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr
    for command in ("chat", "serve", "profile", "bench"):
        helptext = cli(command, "--help").stdout
        assert "--experts" in helptext and "--expert-group" in helptext and "--no-cache" in helptext, command
