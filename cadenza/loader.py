"""Filling a model from a checkpoint, and what the planner and the engine read off a model's shapes.

The loader builds the model on the meta device (no memory), checks every expected tensor's presence and shape
against the safetensors headers before reading any data, then reads shard by shard, each tensor landing in its
parameter (routed experts into their stacked rows), so host memory holds one copy of the model. Block-fp8 weights
(DeepSeek-V3) are dequantized to the compute dtype as they are read; tensors the model does not use (a checkpoint's
multi-token-prediction layer) are never read. Quantized experts (`ExpertFormat` int8 / int4) are packed layer by
layer as each layer's last expert tensor arrives (cadenza.moe.quantize), or read from the disk cache of packed
experts (cadenza.moe.packed_store), in which case the checkpoint's expert tensors are not read at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from cadenza.checkpoint import FP8_DTYPES, SCALE_SUFFIX, BlockFP8, Checkpoint, read_weights
from cadenza.errors import CadenzaError
from cadenza.models import family_of
from cadenza.moe.experts import Experts
from cadenza.moe.placement import ModelSizes
from cadenza.moe.quantize import ExpertFormat, LayerPacker, Progress


def submodule(model: nn.Module, dotted: str) -> nn.Module:
    """The registered child module at `dotted` (a parameter name's module path), walked through `_modules` so a
    family may expose another module under a child's name (Qwen3.5's `model` property: its text model, registered
    under model.language_model as the checkpoint names it)."""
    module = model
    for part in dotted.split(".") if dotted else ():
        module = module._modules[part] if part in module._modules else getattr(module, part)
    return module


def open_checkpoint(path: str | Path, download: bool = True):
    """The one place that decides what a model source is: a GGUF file (or a folder holding one, or a split set)
    opens as `GgufCheckpoint`, anything else as an HF folder (`Checkpoint`). Only headers are read.

    A string that is no existing path but a Hugging Face id (`ORG/NAME[@REVISION][:FILE]`, cadenza.hub) opens
    its snapshot in the hub cache, downloaded first when missing (download False: the cache only); the checkpoint's
    `hub_id` says which (None for a local path)."""
    from cadenza.formats.gguf import GgufCheckpoint, is_gguf
    from cadenza.hub import resolve

    p, hub_id = resolve(path, download=download)
    checkpoint = GgufCheckpoint(p) if is_gguf(p) else Checkpoint(p)
    checkpoint.hub_id = hub_id
    return checkpoint


def open_tokenizer(checkpoint):
    """The checkpoint's tokenizer: an HF folder's tokenizer files, or a GGUF's tokenizer.ggml.* metadata (None
    when the GGUF carries no vocabulary: token ids in and out, as for synthetic models)."""
    from cadenza.text import Tokenizer

    metadata = getattr(checkpoint, "metadata", None)
    if metadata is None:
        return Tokenizer.from_dir(checkpoint.path)
    if "tokenizer.ggml.model" not in metadata:
        return None
    return Tokenizer.from_gguf(metadata, str(checkpoint.path))


def build_meta(checkpoint: Checkpoint) -> nn.Module:
    """The model with every parameter on the meta device: shapes only, no memory."""
    config_cls, model_cls = family_of(checkpoint)
    BlockFP8.from_config(checkpoint.config)  # a quantization cadenza cannot read fails here, before anything else
    quant = checkpoint.config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "mxfp4" and not getattr(model_cls, "reads_mxfp4", 0):
        raise CadenzaError(
            f"config.json says {checkpoint.path} holds MXFP4 weights; cadenza reads MXFP4 in gpt-oss checkpoints only, "
            f"not in a {checkpoint.architecture} model. Use the model's bf16 release."
        )
    config = config_cls.from_hf(checkpoint.config)
    with torch.device("meta"):
        return model_cls(config)


def keep_dense_blocks(model: nn.Module, checkpoint: Checkpoint, device: torch.device, force: bool = False) -> int:
    """On a GPU, a GGUF's quantized attention projections and LM head stay in their blocks: BlockLinear modules
    (cadenza.kernels.gpu_linear) take the meta model's Linear ones, their tiles on `device`, ~0.6 bytes a weight
    against bf16's 2, which leaves the GPU budget to routed experts. force: on any device (tests); the
    CADENZA_DENSE_BLOCKS=0 environment turns it off (layers split over several GPUs: LayerSplit.apply moves the tiles
    to their layers' GPUs). Returns how many layers keep their blocks."""
    if not hasattr(checkpoint, "dense_blocks") or os.environ.get("CADENZA_DENSE_BLOCKS") == "0":
        return 0
    if device.type != "cuda" and not force:
        return 0
    from cadenza.kernels.gpu_linear import BlockLinear

    kept = 0
    weights = [n for n, _ in model.named_parameters() if n.endswith(".weight")]
    for name, qtype in checkpoint.dense_blocks(weights).items():
        parent_name, _, attr = name.removesuffix(".weight").rpartition(".")
        parent = submodule(model, parent_name)
        linear = getattr(parent, attr)
        shape = (linear.out_features, linear.in_features) if isinstance(linear, nn.Linear) else None
        if shape is None or tuple(checkpoint.tensors[name].shape) != shape:
            continue  # check_tensors names the mismatch
        layer = BlockLinear.from_gguf(qtype, checkpoint.block_rows(name), *shape)
        layer.tiles = layer.tiles.to(device)
        if linear.bias is not None:  # read with the other tensors
            layer.bias = nn.Parameter(torch.empty(shape[0], device="meta"), requires_grad=False)
        setattr(parent, attr, layer)
        kept += 1
    return kept


EMBEDDING = "model.embed_tokens.weight"
HOST_EMBEDDING_ENV = "CADENZA_HOST_EMBEDDING"


def embedding_on_host(model: nn.Module) -> bool:
    """Whether a GPU run keeps the token embedding table in host memory, the GPU reading the rows it looks up
    through the memory's device mapping (cadenza.moe.offload.host_memory.embedding_to_host): a token reads one row,
    and the table (Qwen3-30B-A3B's 151936 x 2048 in bf16: 622 MB; DeepSeek-V3's 1.85 GB) leaves the GPU budget to
    routed experts, as llama.cpp keeps it on the CPU. Not where the LM head is the same table (read whole every
    token); CADENZA_HOST_EMBEDDING=0 keeps it on the GPU."""
    if os.environ.get(HOST_EMBEDDING_ENV, "1") == "0":
        return False
    return not getattr(model.config, "tie_word_embeddings", False)


def expected_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape for every parameter of the model (experts unstacked)."""
    out: dict[str, tuple[int, ...]] = {}
    expert_prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            out.update(module.checkpoint_shapes(f"{name}."))
            expert_prefixes.append(f"{name}.")
    for name, p in model.named_parameters():
        if not any(name.startswith(pre) for pre in expert_prefixes):
            out[name] = tuple(p.shape)
    return out


def check_tensors(model: nn.Module, checkpoint: Checkpoint) -> set[str]:
    """Compares the model's expectations with the safetensors headers; returns the names to read."""
    expected = expected_tensors(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        expected.pop("lm_head.weight", None)
    missing = [n for n in expected if n not in checkpoint.tensors]
    if missing:
        raise CadenzaError(
            f"{len(missing)} tensors this {checkpoint.architecture} model needs are missing from {checkpoint.path} "
            f"(first: {missing[0]}). A shard is missing or from another model: download the repository again."
        )
    for name, shape in expected.items():
        found = checkpoint.tensors[name].shape
        if tuple(found) != shape:
            raise CadenzaError(
                f"Tensor {name} in {checkpoint.tensors[name].file.name} has shape {list(found)}, but config.json "
                f"implies {list(shape)}. config.json and the weights come from different models or versions: "
                "download both from the same repository revision."
            )
    return set(expected) | _fp8_scales(expected, checkpoint)


def _fp8_scales(expected: dict[str, tuple[int, ...]], checkpoint: Checkpoint) -> set[str]:
    """The block scales the checkpoint's fp8 tensors need, checked against the headers."""
    quant = BlockFP8.from_config(checkpoint.config)
    fp8 = [n for n in expected if checkpoint.tensors[n].dtype in FP8_DTYPES]
    if fp8 and quant is None:
        raise CadenzaError(
            f"{len(fp8)} tensors in {checkpoint.path} are stored in fp8 (first: {fp8[0]}), but config.json has no "
            "quantization_config saying how they are scaled. Download config.json again from the model's repository."
        )
    scales = set()
    for name in fp8:
        scale, want = quant.scale_name(name), quant.scale_shape(expected[name])
        if scale not in checkpoint.tensors:
            raise CadenzaError(
                f"The fp8 tensor {name} has no block scales {scale} in {checkpoint.path}. A shard is missing or "
                "from another version: download the repository again."
            )
        if tuple(checkpoint.tensors[scale].shape) != want:
            raise CadenzaError(
                f"Block scales {scale} have shape {list(checkpoint.tensors[scale].shape)}, but {list(expected[name])} "
                f"weights in blocks of {list(quant.block)} need {list(want)}. config.json's weight_block_size does "
                "not match the weights: download both from the same repository revision."
            )
        scales.add(scale)
    return scales


def _assign(
    model: nn.Module,
    name: str,
    tensor: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    expert_device: torch.device,
    alloc=None,
) -> Experts | None:
    """Puts one checkpoint tensor in its place; returns the Experts layer this tensor completed, if any. alloc:
    how expert stacks are allocated (`Experts.load_checkpoint_tensor`)."""
    module: nn.Module = model
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        module = submodule(module, part)
        if isinstance(module, Experts):
            done = module.load_checkpoint_tensor(".".join(parts[i + 1 :]), tensor, expert_device, dtype, alloc)
            return module if done else None
    target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
    if parts[-1] in getattr(module, "keep_float32", ()):  # e.g. DeepSeek-V3's routing bias, as the reference keeps it
        target_dtype = torch.float32
    param = nn.Parameter(tensor.to(device=device, dtype=target_dtype), requires_grad=False)
    module.register_parameter(parts[-1], param)
    return None


def expert_layers(model: nn.Module) -> list[tuple[str, Experts]]:
    """(HF name prefix, module) of every routed-experts layer, in order."""
    return [(f"{n}.", m) for n, m in model.named_modules() if isinstance(m, Experts)]


def load_model(
    checkpoint: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    expert_device: torch.device | None = None,
    model: nn.Module | None = None,
    experts: ExpertFormat | None = None,
    device_of=None,
) -> nn.Module:
    """Builds the family's model (or takes `model`, built by `build_meta`) and fills it from the checkpoint, shard
    by shard. Routed experts land on `expert_device` (default `device`): the host, when they are offloaded.

    experts: how routed experts are stored (default plain, in `dtype`). int8 / int4 pack each layer in host memory
    as soon as its expert tensors have arrived, while reading goes on, and keep the packed layers in the disk cache
    (unless `experts.cache` is False): a later load with the same checkpoint, format and group reads them from
    there and skips the checkpoint's expert tensors. device_of(name): each non-expert tensor's device where the
    layers are split over several GPUs (cadenza.layer_split.LayerSplit.device_of); default `device`."""
    model = model if model is not None else build_meta(checkpoint)
    names = check_tensors(model, checkpoint)
    fmt = experts or ExpertFormat()
    layers = moe_layers(model)
    packer = writer = None
    if fmt.packed and layers:
        where = expert_device or device
        if where.type != "cpu":
            raise CadenzaError(
                f"Quantized ({fmt.fmt}) experts are packed in host memory, not on {where}: load them with "
                "expert_device='cpu' (the offloading path does), or use experts='bf16'."
            )
        from cadenza.moe.packed_store import PackedStore

        # a GGUF whose expert blocks hold this format exactly: they are the packed layers (no cache needed)
        exact = fmt.fmt == "blocks" or getattr(checkpoint, "repacks", lambda fmt, group: False)(fmt.fmt, fmt.group)
        store = PackedStore.open(checkpoint, fmt.fmt, fmt.group) if fmt.cache and not exact else None
        if exact:
            mods = expert_layers(model)
            progress = Progress(f"moving {fmt.describe()} experts into place", len(mods), unit="layer")
            for n, (prefix, layer) in enumerate(mods):
                kept = fmt.layer_formats[n] if fmt.fmt == "blocks" else None
                layer.set_packed(checkpoint.packed_experts(prefix, layer, kept), dtype)
                progress.update(n + 1, final=n + 1 == len(mods))
            skip = expert_weight_names(model)
            names = {n for n in names if n not in skip}
        elif store is not None and store.load(layers, dtype):
            skip = expert_weight_names(model)
            names = {n for n in names if n.removesuffix(SCALE_SUFFIX) not in skip}
        else:
            writer = store.writer(len(layers)) if store is not None else None
            on_packed = writer.write if writer else None
            packer = LayerPacker(layers, fmt.fmt, fmt.group, on_packed=on_packed)
    # one line for reading (bytes and rate) and the packing that goes on meanwhile: on a terminal only when nothing
    # is packed (a plain load is quick to redo), also in logs while packing (it can take minutes)
    total = sum(_stored_nbytes(checkpoint, n) for n in names)
    progress = Progress("reading weights", total, unit="bytes", terminal_only=packer is None, every_s=0.2)

    def packed_note(final: bool = False) -> str:
        if packer is None:
            return ""
        note = f"; {packer.done}/{len(layers)} layers quantized to {fmt.fmt}"
        return note + (f" ({packer.timing()})" if final else "")

    try:
        with torch.no_grad():
            read = 0
            for name, tensor in read_weights(checkpoint, names, dtype):
                alloc = packer.take if packer is not None else None
                dev = device_of(name) if device_of is not None else device
                done = _assign(model, name, tensor, dev, dtype, expert_device or device, alloc)
                if done is not None and packer is not None:
                    packer.submit(done)  # waits while the layer before is still packing
                read += _stored_nbytes(checkpoint, name)
                progress.update(min(read, total), packed_note(), final=False)
            if packer is not None:
                packer.finish()
                progress.update(total, packed_note(final=True), final=True)
                packer = None
            else:
                progress.update(total, final=True)
            if getattr(model.config, "tie_word_embeddings", False):
                model.lm_head.weight = model.model.embed_tokens.weight
            for layer in layers:
                layer.loaded(on_host=(expert_device or device).type == "cpu")
    except BaseException:
        if packer is not None:
            packer.abandon()
        if writer is not None:
            writer.abort()
        raise
    packed = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, Experts) and m.packed is not None)
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(packed)]
    left += [n for n, m in model.named_modules() if isinstance(m, Experts) and not m.complete]
    if left:  # the headers promised these; reading did not deliver them
        raise CadenzaError(
            f"{len(left)} tensors could not be read from {checkpoint.path} (first: {left[0]}). A shard is "
            "corrupt: download it again."
        )
    if writer is not None:
        writer.commit()
    return model.eval()


def _stored_nbytes(checkpoint, name: str) -> int:
    """A tensor's bytes in the checkpoint's files (0 for one the table does not know)."""
    info = checkpoint.tensors.get(name)
    return int(getattr(info, "nbytes", 0) or 0)


def expert_tensor_names(model: nn.Module) -> set[str]:
    """The checkpoint names of every routed expert's weights (`experts.{e}.{name}.weight` of each MoE layer)."""
    out: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            out.update(module.checkpoint_shapes(f"{name}."))
    return out


def expert_weight_names(model: nn.Module) -> set[str]:
    """`expert_tensor_names` less the biases (gpt-oss): what packed or kept experts replace; biases are still read."""
    return {n for n in expert_tensor_names(model) if not n.endswith("_bias")}


def moe_layers(model: nn.Module) -> list[Experts]:
    """The model's routed-expert modules, in layer order."""
    return [m for m in model.modules() if isinstance(m, Experts)]


def moe_routers(model: nn.Module) -> list[tuple[torch.Tensor, int] | None]:
    """Per MoE layer (moe_layers' order): the router's weight [E, H] and the experts per token, for guessing a
    layer's experts from another layer's hidden states (speculative prefetch); None where a family's router is
    not a plain linear map."""
    top_k = getattr(model.config, "num_experts_per_tok", None)
    out: list[tuple[torch.Tensor, int] | None] = []
    for name, module in model.named_modules():
        if not isinstance(module, Experts):
            continue
        parent = submodule(model, name.rpartition(".")[0])
        router = getattr(parent, "gate", None)
        if router is None:  # gpt-oss and Llama-4 name it router (a bias, if any, is left out of the guess)
            router = getattr(parent, "router", None)
        weight = getattr(router, "weight", None)
        k = getattr(parent, "top_k", None) or getattr(router, "top_k", None) or top_k
        ok = isinstance(weight, torch.Tensor) and tuple(weight.shape) == (module.num_experts, module.hidden_size)
        out.append((weight, int(k)) if ok and k else None)
    return out


def model_sizes(
    model: nn.Module,
    dtype: torch.dtype,
    experts: str = "bf16",
    expert_group: int | None = None,
    layer_formats: tuple[str, ...] = (),
    dense_blocks: dict[str, str] | None = None,
    host_embedding: bool = False,
) -> ModelSizes:
    """Byte sizes for the planner, from a (meta) model's shapes in the compute dtype, with routed experts stored
    as `experts` ("bf16": plain in `dtype`; "int8" / "int4": packed, scale group `expert_group`; "blocks": each
    layer in its `layer_formats` block format, each layer planned at its own size): nothing is read.
    host_embedding: the token embedding table stays in host memory (`embedding_on_host`), not on the GPU."""
    elem = torch.empty((), dtype=dtype).element_size()
    layers = moe_layers(model)
    # the elements the expert stacks hold (MXFP4 blocks hold two weights a byte: counted by what they occupy)
    expert_params = sum(p.numel() for m in layers for p in m.parameters())
    seen, total = set(), 0
    for p in model.parameters():  # tied weights count once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and model.lm_head.weight is not model.model.embed_tokens.weight:
        total -= model.lm_head.weight.numel()  # still separate on the meta model; tied at load
    if host_embedding:
        total -= model.model.embed_tokens.weight.numel()
    # weights kept in their blocks on the GPU: replaced already (keep_dense_blocks: their tiles), or to be
    # (dense_blocks, weight name -> GGUF type: `cadenza info` plans a GPU run without reading them)
    block_bytes = sum(b.numel() for n, b in model.named_buffers() if n.endswith(".tiles"))
    if dense_blocks:
        from cadenza.kernels.gpu_linear import BlockLinear

        for name, qtype in dense_blocks.items():
            w = model.get_parameter(name)
            total -= w.numel()
            block_bytes += BlockLinear.nbytes_of(qtype, *w.shape)
    first = layers[0] if layers else None
    per_layer: tuple[int, ...] = ()
    if first is None:
        expert_bytes = 0
    elif experts == "blocks":
        per_layer = tuple(m.expert_nbytes_as(f, None, dtype) for m, f in zip(layers, layer_formats, strict=True))
        expert_bytes = max(per_layer)
        per_layer = per_layer if len(set(per_layer)) > 1 else ()
    else:
        expert_bytes = first.expert_nbytes_as(experts, expert_group, dtype)
    # routers kept in float32 whatever the compute dtype (keep_float32: GLM-4.5's, DeepSeek-V3's) take 4 bytes
    float32 = sum(
        p.numel()
        for m in model.modules()
        for n in getattr(m, "keep_float32", ())
        if (p := m._parameters.get(n)) is not None
    )
    cache = model.new_cache(1, dtype, torch.device("meta"))
    return ModelSizes(
        always_bytes=(total - expert_params) * elem + float32 * (4 - elem) + block_bytes,
        kv_bytes_per_token=cache.nbytes_per_token(),
        kv_bytes_per_sequence=cache.nbytes_per_sequence(),
        expert_bytes=expert_bytes,
        num_moe_layers=len(layers),
        num_experts=first.num_experts if first else 0,
        layer_expert_bytes=per_layer,
    )
