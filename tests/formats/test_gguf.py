"""GGUF files load as their HF checkpoints: tiny random models written by transformers, converted to GGUF as
llama.cpp lays them out (tests/formats/gguf_files.py), score equal to transformers (F32) or to the HF model holding
gguf-py's dequantized weights (Q8_0, Q4_0); damaged or unsupported files are refused with clear errors."""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch

from cadenza import LLM, CadenzaError, SamplingParams
from tests.conftest import VOCAB, make_deepseek, make_mixtral, prompt_ids, reference_logits
from tests.formats.gguf_files import dequantized_folder, fuse_gate_up, gguf_tensors, write_gguf
from tests.models.test_dots1 import make_dots1
from tests.models.test_glm4_moe import make_glm4_moe
from tests.models.test_glm4_moe_lite import make_glm4_moe_lite
from tests.models.test_minimax_m2 import make_minimax_m2
from tests.models.test_olmoe import make_olmoe
from tests.models.test_qwen2_moe import make_qwen2_moe
from tests.models.test_qwen3_5_moe import make_qwen3_5_moe
from tests.models.test_qwen3_moe import make_qwen3_moe
from tests.models.test_qwen3_next import make_qwen3_next

TOL = 1e-4

MAKERS = {
    "mixtral": lambda p: make_mixtral(p),
    "qwen2moe": lambda p: make_qwen2_moe(p),
    # llama.cpp always renormalises Qwen3-MoE's top-k weights, as the published models do
    "qwen3moe": lambda p: make_qwen3_moe(p, norm_topk_prob=True),
    "olmoe": lambda p: make_olmoe(p),
    "deepseek2-v2": lambda p: make_deepseek(p, version=2),
    "deepseek2-v3": lambda p: make_deepseek(p, version=3),
    "glm4moe": lambda p: make_glm4_moe(p),
    "minimax-m2": lambda p: make_minimax_m2(p),
    "dots1": lambda p: make_dots1(p),
    "qwen3next": lambda p: make_qwen3_next(p),
    "qwen35moe": lambda p: make_qwen3_5_moe(p),  # the published multimodal checkpoint: its text model converted
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF folder, transformers model), made once."""
    root = tmp_path_factory.mktemp("gguf-src")
    return {name: make(root / name) for name, make in MAKERS.items()}


@pytest.mark.parametrize("name", list(MAKERS))
def test_f32_gguf_matches_transformers(models, tmp_path, name):
    folder, hf = models[name]
    file = write_gguf(folder, tmp_path / f"{name}.gguf")
    llm = LLM(file, device="cpu", dtype="float32")
    assert llm.tokenizer is None  # no tokenizer.ggml.* in these files: token ids in and out
    # (a GGUF of Qwen3.5 holds its text model: the vision tower goes to a separate mmproj file)
    want = "Qwen3_5MoeForCausalLM" if name == "qwen35moe" else hf.config.architectures[0]
    assert llm.checkpoint.architecture == want
    ids = prompt_ids(16)
    got = llm.score(ids)
    assert got.shape == (16, VOCAB)
    assert (got - reference_logits(hf, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_quantized_gguf_equals_dequantized_reference(models, tmp_path, name, qtype, caplog):
    """Block-quantized experts are kept in their blocks by default (`--experts auto`), and dequantized at load with
    one notice under `--experts bf16`: both score as the HF model holding gguf-py's dequantized weights."""
    folder, _ = models[name]
    file = write_gguf(folder, tmp_path / f"{name}-{qtype}.gguf", qtype)
    ref = LLM(dequantized_folder(folder, tmp_path / "ref", qtype), device="cpu", dtype="float32")
    ids = prompt_ids(12)
    want = ref.score(ids)
    for experts in ("auto", "bf16"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cadenza.formats.gguf"):
            llm = LLM(file, device="cpu", dtype="float32", experts=experts)
        notices = [r for r in caplog.records if "are dequantized to the compute dtype" in r.getMessage()]
        layers = [m for m in llm.model.modules() if hasattr(m, "packed") and m.__class__.__name__ == "Experts"]
        if experts == "auto" and name == "olmoe":  # intermediate 48: its down matrices are F32 in the file
            assert len(notices) == 1 and llm.expert_format.fmt == "bf16"
        elif experts == "auto":
            assert not notices and llm.expert_format.describe() == qtype.lower()
            assert layers and all(m.packed is not None and m.packed.fmt == qtype.lower() for m in layers)
        else:
            assert len(notices) == 1 and "--experts auto" in notices[0].getMessage()
            assert all(m.packed is None for m in layers)
        assert llm.checkpoint.tensors["model.embed_tokens.weight"].dtype == qtype
        torch.testing.assert_close(llm.score(ids), want, rtol=0, atol=1e-4)  # kernels: 16 bits of x per product


def test_folder_and_tied_embeddings(models, tmp_path):
    """A folder holding one .gguf opens as it; without output.weight the LM head is the embedding."""
    folder, hf = make_qwen2_moe(tmp_path / "tied", tie_word_embeddings=True)
    (tmp_path / "g").mkdir()
    write_gguf(folder, tmp_path / "g" / "model.gguf", drop=("output.weight",))
    llm = LLM(tmp_path / "g", device="cpu", dtype="float32")
    assert llm.config.tie_word_embeddings
    ids = prompt_ids(8)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL


def test_split_files(models, tmp_path):
    """NAME-00001-of-00002.gguf and its second part: every tensor found from the first; a missing part named."""
    import gguf

    folder, hf = models["mixtral"]
    single = write_gguf(folder, tmp_path / "one.gguf")
    reader = gguf.GGUFReader(single)
    names = [t.name for t in reader.tensors]
    half = len(names) // 2
    a = write_gguf(folder, tmp_path / "m-00001-of-00002.gguf", drop=tuple(names[half:]))
    write_gguf(folder, tmp_path / "m-00002-of-00002.gguf", drop=tuple(names[:half]))
    ids = prompt_ids(8)
    assert (LLM(a, device="cpu", dtype="float32").score(ids) - reference_logits(hf, ids)).abs().max() <= TOL
    (tmp_path / "m-00002-of-00002.gguf").unlink()
    with pytest.raises(CadenzaError, match="m-00002-of-00002.gguf"):
        LLM(a, device="cpu", dtype="float32")


def test_bad_files(models, tmp_path):
    import gguf

    folder, _ = models["mixtral"]
    good = write_gguf(folder, tmp_path / "good.gguf")
    data = good.read_bytes()

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CadenzaError, match=r"cut\.gguf.*download it again"):
        LLM(cut, device="cpu")

    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"GGML" + data[4:])
    with pytest.raises(CadenzaError, match=r"magic\.gguf is not a readable GGUF"):
        LLM(magic, device="cpu")

    other = write_gguf(
        folder, tmp_path / "phi.gguf", extra={"general.architecture": ("phi2", gguf.GGUFValueType.STRING)}
    )
    with pytest.raises(CadenzaError, match=r"phi\.gguf.*'phi2'.*qwen3moe"):
        LLM(other, device="cpu")

    dense = write_gguf(folder, tmp_path / "dense.gguf", extra={"llama.expert_count": (0, gguf.GGUFValueType.UINT32)})
    with pytest.raises(CadenzaError, match=r"dense\.gguf holds a dense llama model.*Mixture-of-Experts"):
        LLM(dense, device="cpu")

    text = tmp_path / "weights.txt"
    text.write_text("x")
    with pytest.raises(CadenzaError, match=r"a file, not a model folder or a \.gguf file"):
        LLM(text, device="cpu")


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_glm_4_7_flash_as_deepseek2_with_its_mtp_block(tmp_path, qtype):
    """GLM-4.7-Flash converts as deepseek2 (llama.cpp's Glm4MoeLiteModel), and a converter that exports its
    multi-token-prediction layer counts it in block_count with nextn_predict_layers: the file runs the main layers
    only, equal to transformers' Glm4MoeLiteForCausalLM (F32) or to it holding the dequantized weights (Q8_0)."""
    import gguf
    from safetensors.torch import load_file, save_file

    from tests.conftest import edit_config

    folder, hf = make_glm4_moe_lite(tmp_path / "hf", mlp_layer_types=["dense", "dense", "sparse"])
    # the MTP block as the converter writes it: a whole decoder layer after the main ones (blk.3)
    with_mtp = shutil.copytree(folder, tmp_path / "with-mtp")
    main = load_file(folder / "model.safetensors")
    mtp = {k.replace(".layers.2.", ".layers.3."): t.clone() for k, t in main.items() if ".layers.2." in k}
    save_file({**main, **mtp}, with_mtp / "model.safetensors")
    edit_config(with_mtp, num_nextn_predict_layers=1)
    u32 = gguf.GGUFValueType.UINT32
    extra = {"deepseek2.block_count": (4, u32), "deepseek2.nextn_predict_layers": (1, u32)}
    file = write_gguf(with_mtp, tmp_path / f"flash-{qtype}.gguf", qtype, extra=extra)
    assert any(t.name.startswith("blk.3.") for t in gguf.GGUFReader(file).tensors)
    llm = LLM(file, device="cpu", dtype="float32")
    assert llm.checkpoint.architecture == "DeepseekV3ForCausalLM" and len(llm.model.model.layers) == 3
    assert llm.config.first_k_dense_replace == 2 and llm.config.num_nextn_predict_layers == 1
    ids = prompt_ids(16)
    if qtype == "F32":
        want = reference_logits(hf, ids)
    else:
        want = LLM(dequantized_folder(folder, tmp_path / "ref", qtype), device="cpu", dtype="float32").score(ids)
    assert (llm.score(ids) - want).abs().max().item() <= TOL


def test_minimax_m2_with_another_router_is_refused(models, tmp_path):
    """A minimax-m2 file whose expert_gating_func says softmax (1) describes another model than MiniMax-M2's sigmoid
    router: refused, naming the key, rather than computed with the wrong router."""
    import gguf

    folder, _ = models["minimax-m2"]
    key = {"minimax-m2.expert_gating_func": (1, gguf.GGUFValueType.UINT32)}
    with pytest.raises(CadenzaError, match=r"softmax\.gguf says minimax-m2\.expert_gating_func=1.*sigmoid"):
        LLM(write_gguf(folder, tmp_path / "softmax.gguf", extra=key), device="cpu")


def test_qwen3_next_older_files_and_qwen3_5_text_model(models, tmp_path):
    """Older converters stored Qwen3-Next's in_proj_qkvz whole, as HF has it (ssm_in, which llama.cpp still reads);
    a Qwen3.5 GGUF converted from the text-only model equals one from the multimodal checkpoint. Each is checked
    against transformers, and the fixes the reader undoes are the converter's (the value heads moved when the key
    and value heads differ: 2 and 4 here)."""
    import gguf

    from cadenza.formats.gguf import GgufCheckpoint

    folder, hf = models["qwen3next"]
    tensors = gguf_tensors(folder)[1]
    qkv, z = tensors["blk.0.attn_qkv.weight"], tensors["blk.0.attn_gate.weight"]
    file = write_gguf(folder, tmp_path / "new.gguf")
    ckpt = GgufCheckpoint(file)
    info = ckpt.tensors["model.layers.0.linear_attn.in_proj_qkvz.weight"]
    assert (info.fixes, info.also) == (("qkvz",), "blk.0.attn_gate.weight")
    assert info.shape == (qkv.shape[0] + z.shape[0], qkv.shape[1])
    assert ckpt.tensors["model.layers.0.linear_attn.A_log"].fixes == ("a_log",)
    assert ckpt.tensors["model.norm.weight"].fixes == ("centred",)
    assert ckpt.tensors["model.layers.0.linear_attn.norm.weight"].fixes == ()  # the DeltaNet's own norm: as it is
    old = write_gguf(
        folder, tmp_path / "old.gguf", drop=("blk.0.attn_qkv.weight", "blk.0.attn_gate.weight"),
        tensors={"blk.0.ssm_in.weight": hf.model.layers[0].linear_attn.in_proj_qkvz.weight.detach().numpy()},
    )  # fmt: skip
    ids = prompt_ids(16)
    want = reference_logits(hf, ids)
    assert (LLM(old, device="cpu", dtype="float32").score(ids) - want).abs().max().item() <= TOL
    text_folder, text_hf = make_qwen3_5_moe(tmp_path / "qwen35-text", text_only=True)
    file = write_gguf(text_folder, tmp_path / "text.gguf")
    llm = LLM(file, device="cpu", dtype="float32")
    assert llm.checkpoint.architecture == "Qwen3_5MoeForCausalLM"
    assert llm.checkpoint.tensors["model.layers.0.linear_attn.out_proj.weight"].fixes == ("v_cols",)
    assert (llm.score(ids) - reference_logits(text_hf, ids)).abs().max().item() <= TOL
    assert gguf.GGUFReader(file).fields["qwen35moe.ssm.time_step_rank"].parts[-1][0] == 4


@pytest.mark.parametrize(("qtype", "experts"), [("F32", "auto"), ("Q8_0", "auto"), ("Q8_0", "int8"), ("Q4_0", "auto")])
def test_fused_gate_up_experts_read_as_separate(models, tmp_path, qtype, experts):
    """A file converted with --fuse-gate-up-exps (each expert's gate rows then its up rows in ffn_gate_up_exps)
    scores as the same file with them apart, bit for bit: dequantized at load, kept in their blocks, or as int8."""
    folder, _ = models["mixtral"]
    plain = write_gguf(folder, tmp_path / "plain.gguf", qtype)
    fused = fuse_gate_up(plain, tmp_path / "fused.gguf")
    want, llm = (LLM(f, device="cpu", dtype="float32", experts=experts) for f in (plain, fused))
    gate, up = (llm.checkpoint.tensors[f"model.layers.1.block_sparse_moe.experts.3.{w}.weight"] for w in ("w1", "w3"))
    inter = llm.config.intermediate_size
    assert (gate.source, gate.rows, up.rows) == ("blk.1.ffn_gate_up_exps.weight", (0, inter), (inter, 2 * inter))
    assert gate.shape == up.shape == (inter, llm.config.hidden_size)
    assert llm.expert_format.describe() == want.expert_format.describe()
    ids = prompt_ids(12)
    assert torch.equal(llm.score(ids), want.score(ids))


def test_unsupported_type(models, tmp_path):
    """A tensor in a type gguf-py cannot dequantize (Q8_1 here) is refused, naming the readable types."""
    import gguf

    folder, _ = models["olmoe"]
    file = write_gguf(folder, tmp_path / "q81.gguf", drop=("blk.0.attn_q.weight",))
    w = gguf.GGUFWriter(tmp_path / "bad.gguf", "olmoe")
    r = gguf.GGUFReader(file)
    for k, f in r.fields.items():
        if not k.startswith("GGUF.") and k != "general.architecture":
            w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, t.data)
    q81 = gguf.GGMLQuantizationType.Q8_1
    w.add_tensor("blk.0.attn_q.weight", torch.zeros(64, 2 * 40, dtype=torch.uint8).numpy(), raw_dtype=q81)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CadenzaError, match=r"bad\.gguf.*Q8_1.*Readable types: .*Q4_K"):
        LLM(tmp_path / "bad.gguf", device="cpu")


def test_info_describes_gguf(models, tmp_path):
    from tests.cli.test_cli import cli

    folder, hf = models["qwen3moe"]
    file = write_gguf(folder, tmp_path / "q3.gguf", "Q8_0")
    r = cli("info", "--model", str(file), "--json", "--gpu-memory", "1GiB")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["architecture"] == "Qwen3MoeForCausalLM"
    assert d["gguf_types"]["experts"].keys() == {"Q8_0"} and "F32" in d["gguf_types"]["other"]
    assert "placement" in d
    text = cli("info", "--model", str(file))
    assert text.returncode == 0, text.stderr
    assert "Qwen3MoeForCausalLM" in text.stdout and "Q8_0" in text.stdout
    assert re.search(r"^gguf attn +F32 [0-9.]+ MB, Q8_0", text.stdout, re.M)  # (the label apart from its value)


def test_hf_folder_with_stray_gguf_stays_hf(models, tmp_path):
    """config.json decides: a HF folder that also holds a .gguf still loads as the HF folder."""
    folder, _ = models["olmoe"]
    copy = shutil.copytree(folder, tmp_path / "hf")
    write_gguf(folder, copy / "x.gguf")
    assert type(LLM(copy, device="cpu", dtype="float32").checkpoint).__name__ == "Checkpoint"


def test_gguf_with_its_vocabulary_answers_like_the_hf_folder(tmp_path):
    """A GGUF that carries its tokenizer (tokenizer.ggml.*) runs from text to text: the same greedy answer as the HF
    folder it was written from, whose tokenizer.json is the same byte-level BPE."""
    from tests.text.test_gguf_tokenizer import bpe_kv
    from tests.text.tokenizer_files import write_bpe_tokenizer

    # (llama.cpp always renormalises qwen3moe top-k weights, so the GGUF carries no switch for it)
    folder, _ = make_qwen3_moe(tmp_path / "hf", vocab_size=VOCAB + 8, norm_topk_prob=True)
    write_bpe_tokenizer(folder)  # the folder's own tokenizer.json
    kv = bpe_kv(tmp_path / "tok", "gpt-2")  # the same training, as GGUF metadata (GPT-2 split: ByteLevel's)
    kv["tokenizer.ggml.add_bos_token"] = True
    file = write_gguf(folder, tmp_path / "m.gguf", extra=kv)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    from_gguf = LLM(file, device="cpu", dtype="float32")
    from_hf = LLM(folder, device="cpu", dtype="float32")
    prompt = "Hello world, the numbers 12 and 345."
    assert from_gguf.tokenizer.encode(prompt) == from_hf.tokenizer.encode(prompt)
    a, b = from_gguf.generate(prompt, params), from_hf.generate(prompt, params)
    assert a.token_ids == b.token_ids and a.text == b.text and len(a.token_ids) == 12
    messages = [{"role": "user", "content": "hi"}]
    assert from_gguf.chat_prompt(messages)  # the GGUF's chat template renders


def test_gguf_file_runs_from_the_cli_and_is_served(tmp_path):
    """Issue 18's user: `cadenza run --model FILE.gguf` prints the same greedy text as the library, and a server
    over the same file answers a chat request with the file's own chat template and tokenizer."""
    from tests.cli.test_cli import cli
    from tests.server.serving import served_client
    from tests.text.test_gguf_tokenizer import bpe_kv

    folder, _ = make_qwen3_moe(tmp_path / "hf", vocab_size=VOCAB + 8, norm_topk_prob=True)
    kv = bpe_kv(tmp_path / "tok", "gpt-2")
    kv["tokenizer.ggml.add_bos_token"] = True
    kv["tokenizer.chat_template"] = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    file = write_gguf(folder, tmp_path / "Qwen3-tiny-Q8_0.gguf", "Q8_0", extra=kv)
    r = cli("run", "--model", str(file), "--prompt", "Hello world", "--max-tokens", "8", "--temperature", "0",
            "--ignore-eos", "--dtype", "float32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    llm = LLM(file, device="cpu", dtype="float32")
    want = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert r.stdout == want.text + "\n" and len(want.token_ids) == 8
    messages = [{"role": "user", "content": "hi there"}]
    prompt = llm.chat_prompt(messages)  # token ids of the file's template, rendered
    assert llm.tokenizer.decode(prompt).endswith("hi there\n<|assistant|>")
    with served_client(llm, max_queue=4) as c:
        body = {"model": "m", "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        got = c.post("/v1/chat/completions", json=body)
        assert got.status_code == 200, got.text
        answer = got.json()
    chat = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert answer["choices"][0]["message"]["content"] == chat.text
    assert answer["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("name", ["mixtral", "qwen3moe"])
def test_q8_0_experts_kept_exactly_as_int8(models, tmp_path, name, caplog):
    """Q8_0 experts with --experts int8 --expert-group 32 are packed from their blocks: the packed values equal the
    file's dequantized ones bit for bit, nothing is dequantized to the compute dtype, and the model scores as the
    dequantized reference run with the same int8 experts."""
    import gguf

    from cadenza.kernels.layout import dequantize
    from cadenza.loader import moe_layers

    folder, _ = models[name]
    file = write_gguf(folder, tmp_path / f"{name}-Q8_0.gguf", "Q8_0")
    with caplog.at_level(logging.WARNING, logger="cadenza.formats.gguf"):
        llm = LLM(file, device="cpu", dtype="float32", experts="int8", expert_group=32)
    assert not [r for r in caplog.records if "dequantizes" in r.getMessage() or "re-round" in r.getMessage()]
    reader = gguf.GGUFReader(str(file))
    raw = {t.name: t for t in reader.tensors}
    q8 = gguf.GGMLQuantizationType.Q8_0
    for index, layer in enumerate(moe_layers(llm.model)):
        assert layer.packed is not None and (layer.packed.fmt, layer.packed.group) == ("int8", 32)
        gate, up, down = dequantize(layer.packed)
        blk = index + (llm.config.num_hidden_layers - len(moe_layers(llm.model)))
        for got, part in ((gate, "gate"), (up, "up"), (down, "down")):
            want = gguf.quants.dequantize(np.asarray(raw[f"blk.{blk}.ffn_{part}_exps.weight"].data), q8)
            assert torch.equal(got.float(), torch.from_numpy(np.ascontiguousarray(want)))
    ref = LLM(dequantized_folder(folder, tmp_path / "ref", "Q8_0"), device="cpu", dtype="float32", experts="int8",
              expert_group=32, expert_cache=False)  # fmt: skip
    ids = prompt_ids(12)
    torch.testing.assert_close(llm.score(ids), ref.score(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("name", ["deepseek2-v2", "deepseek2-v3"])
def test_deepseek_split_kv_b(models, tmp_path, name, qtype):
    """Newer llama.cpp converters split DeepSeek's attn_kv_b into attn_k_b (transposed) and attn_v_b: put back
    together, F32 scores like transformers and Q8_0 like the same file written with attn_kv_b whole, on the
    HF model holding gguf-py's round trip of the two halves."""
    import gguf
    from safetensors.torch import load_file, save_file

    folder, hf = models[name]
    file = write_gguf(folder, tmp_path / f"{name}-split.gguf", qtype, split_kv_b=True)
    llm = LLM(file, device="cpu", dtype="float32")
    assert llm.checkpoint.tensors["model.layers.0.self_attn.kv_b_proj.weight"].also == "blk.0.attn_v_b.weight"
    ids = prompt_ids(12)
    if qtype == "F32":
        assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL
        return
    ref = dequantized_folder(folder, tmp_path / "ref", qtype)
    sd = load_file(ref / "model.safetensors")
    reader = gguf.GGUFReader(file)
    deq = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    for key in [k for k in sd if k.endswith("kv_b_proj.weight")]:
        layer = key.split(".")[2]
        k_b, v_b = deq[f"blk.{layer}.attn_k_b.weight"], deq[f"blk.{layer}.attn_v_b.weight"]
        sd[key] = torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(sd[key].shape).contiguous()
    save_file(sd, ref / "model.safetensors")
    want = LLM(ref, device="cpu", dtype="float32").score(ids)
    torch.testing.assert_close(llm.score(ids), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["mixtral", "qwen2moe", "glm4moe"])  # rope-interleaved q/k; attention biases
def test_attention_kept_in_blocks_scores_as_dequantized(models, tmp_path, name, monkeypatch):
    """On a GPU, a GGUF's quantized attention projections stay in their blocks (loader.keep_dense_blocks, forced
    here on the CPU, where BlockLinear multiplies the dequantized tiles): the same scores as the dequantized file,
    and the always-on bytes the planner counts shrink by what the blocks save."""
    from cadenza import loader
    from cadenza.kernels.gpu_linear import BlockLinear

    folder, _ = models[name]
    file = write_gguf(folder, tmp_path / f"{name}-Q8_0.gguf", "Q8_0")
    ids = prompt_ids(12)
    plain = LLM(file, device="cpu", dtype="float32")
    monkeypatch.setattr("cadenza.llm.keep_dense_blocks", lambda *a: loader.keep_dense_blocks(*a, force=True))
    kept = LLM(file, device="cpu", dtype="float32")
    layers = [m for m in kept.model.modules() if isinstance(m, BlockLinear)]
    tied = getattr(kept.config, "tie_word_embeddings", False)
    assert len(layers) == 4 * kept.config.num_hidden_layers + (not tied) and {m.fmt for m in layers} == {"q8_0"}
    assert (kept.score(ids) - plain.score(ids)).abs().max().item() <= 1e-4
    saved = sum(m.in_features * m.out_features * 4 - m.tiles.numel() for m in layers)  # fp32 weights -> tiles
    assert plain.sizes.always_bytes - kept.sizes.always_bytes == saved
    # `cadenza info` plans a GPU run from the shapes alone: the same sizes
    from cadenza.loader import build_meta, model_sizes

    meta = build_meta(kept.checkpoint)
    dense = kept.checkpoint.dense_blocks([n for n, _ in meta.named_parameters()])
    assert model_sizes(meta, torch.float32, dense_blocks=dense).always_bytes == kept.sizes.always_bytes
    monkeypatch.setenv("CADENZA_DENSE_BLOCKS", "0")
    off = LLM(file, device="cpu", dtype="float32")
    assert not any(isinstance(m, BlockLinear) for m in off.model.modules())


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_cuda_attention_in_blocks_equals_cpu(models, tmp_path, qtype):
    """On a CUDA GPU the attention projections run from their blocks (Triton: decode rows and the dequantize route
    of a prefill) with the experts offloaded, CUDA graphs on: the CPU run's scores and greedy tokens."""
    from cadenza.kernels.gpu_linear import BlockLinear

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on the accelerator machine)")
    folder, _ = models["mixtral"]
    file = write_gguf(folder, tmp_path / f"mixtral-{qtype}.gguf", qtype)
    ids = prompt_ids(12)
    cpu = LLM(file, device="cpu", dtype="float32")
    want = cpu.score(ids)
    tokens = cpu.generate(ids[:6], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)).token_ids
    gpu = LLM(file, device="cuda", dtype="float32", gpu_memory="1GiB")
    assert any(isinstance(m, BlockLinear) for m in gpu.model.modules())
    assert (gpu.score(ids).cpu() - want).abs().max().item() <= 1e-3
    out = gpu.generate(ids[:6], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert out.token_ids == tokens


@pytest.mark.parametrize(("name", "qtype"), [("mixtral", "Q4_0"), ("deepseek2-v3", "Q8_0"), ("qwen3moe", "F16")])
def test_cadenza_reader_reads_what_gguf_py_reads(models, tmp_path, name, qtype):
    """cadenza's header reader (formats/gguf_reader.py, written for speed) gives gguf-py's metadata values and
    tensors: names, types, shapes, sizes, offsets and the bytes."""
    import gguf

    from cadenza.formats.gguf_reader import GgufReader
    from cadenza.text.gguf import gguf_metadata

    file = write_gguf(
        models[name][0], tmp_path / "m.gguf", qtype,
        extra={"test.floats": [0.5, -1.25], "test.flag": True, "test.words": ["a", "é", ""]},
    )  # fmt: skip
    ours, ref = GgufReader(file), gguf.GGUFReader(file)
    assert ours.metadata == gguf_metadata(ref)
    assert ours.metadata["test.words"] == ["a", "é", ""] and ours.metadata["test.flag"] is True
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert (a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == (
            b.tensor_type,
            b.n_elements,
            b.n_bytes,
            b.data_offset,
        )
        assert a.shape.tolist() == b.shape.tolist() and a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data, b.data)
