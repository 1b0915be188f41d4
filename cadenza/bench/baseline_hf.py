"""The classic offloading baseline: transformers + accelerate `device_map` on the same synthetic weights.

accelerate keeps whole decoder layers in host memory and copies every weight of each such layer to the GPU on every
forward pass, the experts a token does not use included. That is the design cadenza is measured against, run as a
user would run it: `infer_auto_device_map` with a GPU budget, then `dispatch_model`, then `generate`.
"""

from __future__ import annotations

import gc
import importlib.util
import re
import statistics
import time

import torch
from torch import nn

from cadenza.bench.machine import host_memory_gib
from cadenza.bench.report import BenchResult, GiB, roofline_fraction
from cadenza.bench.synthetic import SyntheticCheckpoint
from cadenza.errors import CadenzaError

SYSTEM = "transformers+accelerate"

# cadenza / checkpoint names of the three expert projections -> their role in a SwiGLU expert
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_EXPERT_RE = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
# transformers >= 5 renamed some MoE blocks (Mixtral's block_sparse_moe is now mlp) and fused each layer's experts
_BLOCK_RENAMES = (("block_sparse_moe.", "mlp."),)


def baseline_unavailable(device: torch.device) -> str | None:
    """Why the baseline cannot run here (with the fix), or None when it can."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "the transformers+accelerate baseline needs a CUDA GPU; run it on a GPU machine, or pass --no-baseline"
    missing = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"the transformers+accelerate baseline needs {' and '.join(missing)}: "
            f"pip install {' '.join(missing)}, or pass --no-baseline"
        )
    return None


# --- building the transformers model from the synthetic weights --------------------------------------------------


def hf_config(ckpt: SyntheticCheckpoint):
    """The transformers config of a checkpoint's config.json dict."""
    from transformers import AutoConfig

    cfg = dict(ckpt.config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def empty_hf_model(ckpt: SyntheticCheckpoint) -> nn.Module:
    """The transformers model with parameters on the meta device (no memory) and real buffers (rotary tables)."""
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return getattr(transformers, ckpt.architecture)(hf_config(ckpt)).eval()


def _hf_target(name: str, params: dict[str, torch.Size]) -> tuple[str, tuple]:
    """Where checkpoint tensor `name` goes in the transformers model: (parameter name, index into it)."""
    if name in params:  # non-expert tensors, and experts in transformers 4.x's per-expert layout
        return name, ()
    renamed = name
    for old, new in _BLOCK_RENAMES:
        renamed = renamed.replace(old, new)
    if renamed in params:
        return renamed, ()
    m = _EXPERT_RE.match(renamed)
    if m and m["proj"] in _ROLE:
        e, role, prefix = int(m["e"]), _ROLE[m["proj"]], m["prefix"]
        if role == "down" and f"{prefix}.experts.down_proj" in params:
            return f"{prefix}.experts.down_proj", (e,)  # [E, H, I]
        fused = f"{prefix}.experts.gate_up_proj"  # [E, 2I, H]: gate rows first, then up (as chunk(2) splits it)
        if role != "down" and fused in params:
            i = params[fused][1] // 2
            return fused, (e, slice(0, i) if role == "gate" else slice(i, 2 * i))
    raise RuntimeError(
        f"cannot place checkpoint tensor {name} in this transformers version's model (no parameter "
        f"{renamed}); the baseline's name mapping needs updating for it"
    )


def fill_hf_model(model: nn.Module, ckpt: SyntheticCheckpoint, dtype: torch.dtype = torch.bfloat16) -> None:
    """Gives every parameter of `model` (meta or real) fresh CPU storage filled from `ckpt.iter_tensors`.

    Works with either expert layout: per-expert `experts.E.w1.weight` (transformers 4.x) or fused
    `experts.gate_up_proj` [E, 2I, H] = cat(w1, w3) and `experts.down_proj` [E, H, I] (transformers >= 5).
    """
    params = {n: p.shape for n, p in model.named_parameters()}
    storage: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    with torch.no_grad():
        for name, tensor in ckpt.iter_tensors():
            target, index = _hf_target(name, params)
            dst = storage.get(target)
            if dst is None:
                dst = storage[target] = torch.empty(params[target], dtype=dtype)
            part = dst[index] if index else dst
            if part.shape != tensor.shape:
                raise RuntimeError(f"{name} {list(tensor.shape)} does not fit {target}{list(index)} {list(part.shape)}")
            part.copy_(tensor)
            filled[target] = filled.get(target, 0) + tensor.numel()
    short = [n for n in params if n not in storage or filled[n] != storage[n].numel()]
    if short:
        raise RuntimeError(f"{len(short)} parameters were not (fully) filled from the checkpoint, first: {short[0]}")
    for name, tensor in storage.items():
        module_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


# --- what a device map implies per token -------------------------------------------------------------------------


def _device_of(param: str, device_map: dict) -> str:
    keys = [k for k in device_map if k == "" or param == k or param.startswith(k + ".")]
    return str(device_map[max(keys, key=len)]) if keys else "cpu"


def _per_token_bytes(model: nn.Module, device_map: dict, top_k: int, num_experts: int) -> dict[str, float]:
    """Bytes per decode token: those accelerate copies from the host (every weight of an offloaded layer), and the
    lower bound's inputs: bytes a token needs (k of E experts, not the embedding table) on host vs GPU."""
    copied = host_needed = gpu_needed = 0.0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        needed = 0.0 if "embed_tokens" in name else nbytes * (top_k / num_experts if ".experts." in name else 1)
        if _device_of(name, device_map) in ("cpu", "disk"):
            copied += nbytes
            host_needed += needed
        else:
            gpu_needed += needed
    return {"copied": copied, "host_needed": host_needed, "gpu_needed": gpu_needed}


def _layer_devices(model: nn.Module, device_map: dict) -> list[str]:
    """Device of each decoder layer's experts, in layer order."""
    out = []
    for name, _ in model.named_parameters():
        if ".experts." in name and (name.endswith("gate_up_proj") or name.endswith(".0.w1.weight")):
            out.append(_device_of(name, device_map))
    return out


# --- the measurement ---------------------------------------------------------------------------------------------


def _token_clock():
    """A `generate` streamer that timestamps each new token (its first put() is the prompt). A BaseStreamer
    subclass, built on first use so that importing this module does not import transformers."""
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False
            self.times: list[float] = []

        def put(self, value) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    return TokenClock()


def run_transformers_offload(
    ckpt: SyntheticCheckpoint,
    gpu_budget_gib: float,
    prompt_ids: list[int],
    new_tokens: int,
    trials: int = 1,
    machine: dict | None = None,
    scenario: str = "D1",
) -> dict:
    """Builds the transformers model on the CPU from `ckpt`, dispatches it with a `gpu_budget_gib` GPU budget,
    measures greedy generation (one warm-up token, then `trials` requests of `new_tokens`), and frees it all.

    Returns a BenchResult dict. Seconds per token: give it a few new tokens (benchmarks/README.md: 8).
    """
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    reason = baseline_unavailable(device)
    if reason:
        raise CadenzaError(reason[0].upper() + reason[1:] + ".")
    import accelerate
    import transformers
    from accelerate.hooks import remove_hook_from_submodules

    wb = ckpt.weight_bytes()
    result = BenchResult(
        scenario=scenario,
        system=SYSTEM,
        model=ckpt.name,
        policy="device_map",
        gpu_budget_gib=gpu_budget_gib,
        prompt_tokens=len(prompt_ids),
        new_tokens=new_tokens,
        device=str(device),
        trials=trials,
        model_bytes=ckpt.total_bytes,
    )
    model = None
    try:
        t0 = time.perf_counter()
        model = empty_hf_model(ckpt)
        fill_hf_model(model, ckpt, torch.bfloat16)
        build_s = time.perf_counter() - t0
        host_gib = (machine or {}).get("host_mem_gib") or host_memory_gib() or 128
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        max_memory = {device.index: f"{gpu_budget_gib}GiB", "cpu": f"{host_gib}GiB"}
        device_map = accelerate.infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
        if "disk" in device_map.values():
            raise CadenzaError(
                f"The baseline needs more than the host's {host_gib} GiB of memory for this model. Run it on a "
                "machine with more memory, or pass --no-baseline."
            )
        per_token = _per_token_bytes(model, device_map, wb.experts_per_token, wb.num_experts)
        layers = _layer_devices(model, device_map)
        skip_keys = getattr(model, "_skip_keys_device_placement", None)
        model = accelerate.dispatch_model(model, device_map=device_map, skip_keys=skip_keys)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        gen_kw = dict(
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            pad_token_id=ckpt.config.get("eos_token_id"),
        )
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen_kw)  # warm-up: one prompt pass
            ttfts, decode, totals = [], [], []
            for _ in range(trials):
                clock = _token_clock()
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock, **gen_kw)
                totals.append(time.perf_counter() - start)
                ttfts.append(clock.times[0] - start)
                if len(clock.times) > 1:
                    decode.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
        result.peak_gpu_mem_gib = torch.cuda.max_memory_allocated(device) / GiB
        result.trial_times_s = totals
        result.ttft_s = statistics.median(ttfts)
        result.prefill_tok_s = len(prompt_ids) / result.ttft_s
        result.decode_tok_s_trials = decode
        result.decode_tok_s = statistics.median(decode) if decode else None
        n_gpu = sum(d not in ("cpu", "disk") for d in layers)
        result.placement = {
            "summary": f"{n_gpu}/{len(layers)} decoder layers on the GPU; {len(layers) - n_gpu} in host memory, "
            "copied to the GPU whole on every forward pass",
            "resident_per_layer": [0 if d in ("cpu", "disk") else wb.num_experts for d in layers],
            "device_map": {k: str(v) for k, v in device_map.items()},
        }
        share = n_gpu / len(layers) if layers else 1.0
        result.expert_work_share = {"gpu": share, "cpu": 0.0, "fetched": 1.0 - share}
        result.host_bytes_per_token = per_token["copied"]
        result.gpu_bytes_per_token = per_token["gpu_needed"]
        if result.decode_tok_s:
            result.roofline_fraction = roofline_fraction(
                per_token["host_needed"],
                per_token["gpu_needed"],
                (machine or {}).get("dram_read_gb_s"),
                (machine or {}).get("gpu_mem_bw_gb_s"),
                1.0 / result.decode_tok_s,
            )
        result.notes += [
            f"built the transformers model in {build_s:.1f} s; {trials} trial(s) after a 1-token warm-up "
            "(seconds per token: benchmarks/README.md gives this baseline few tokens)",
            "host_bytes_per_token: every weight of the offloaded layers, copied each token; roofline_fraction "
            "uses the bytes a token needs (k experts of each layer, host vs GPU) as for cadenza",
            f"decode tok/s from streamer timestamps (tokens after the first); transformers "
            f"{transformers.__version__}, accelerate {accelerate.__version__}",
        ]
    finally:
        # 93 GB in host memory: it must be gone before cadenza loads its own copy.
        if model is not None:
            remove_hook_from_submodules(model)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return result.as_dict()
