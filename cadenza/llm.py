"""The public Python API: `LLM` loads a checkpoint folder and generates; see `cadenza/__init__.py`."""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cadenza.checkpoint import DTYPE_NAMES, Checkpoint
from cadenza.engine import Engine, Generation, GenerationStats
from cadenza.errors import CadenzaError
from cadenza.generation import Step
from cadenza.layer_split import LayerSplit, budgets_for, edge_bytes, split_devices
from cadenza.loader import (
    EMBEDDING,
    build_meta,
    embedding_on_host,
    keep_dense_blocks,
    load_model,
    model_sizes,
    moe_layers,
    moe_routers,
    open_checkpoint,
    open_tokenizer,
)
from cadenza.moe.devices import DeviceShare, merged
from cadenza.moe.offload import calibration, planning
from cadenza.moe.offload.host_memory import embedding_to_host
from cadenza.moe.offload.orchestra import POLICIES, OffloadOptions, Orchestra
from cadenza.moe.offload.stages import Stages
from cadenza.moe.placement import GiB, Placement, format_size, load_popularity, parse_size
from cadenza.moe.quantize import ExpertFormat
from cadenza.sampling import MAX_TOP_LOGPROBS, SamplingParams
from cadenza.scoring import PromptLogprobs, prompt_scores
from cadenza.text.token_text import TokenText

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]

DEFAULT_MAX_CONTEXT = 8192  # tokens, unless max_context says otherwise
CPU_MAX_BATCH = 16  # sequences decoded together by a throughput job on the CPU, by default
THROUGHPUT_WINDOW = 256  # prompts sorted by length together in generate(mode="throughput")
PREFILL_CHUNK = 2048  # tokens a forward pass carries at most, by default (prefill_chunk): bounds the workspace


@dataclass
class GenerationResult:
    """What `LLM.generate` returns for one prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (an end id, stop token or stop string) or "length" (max_tokens or the context)
    stats: GenerationStats
    logprobs: list[float] | None = None  # per generated token (SamplingParams.logprobs)
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per generated token (SamplingParams.top_logprobs)
    cumulative_logprob: float | None = None  # beam search: the best beam's length-penalised score
    # with logprobs (and a tokenizer): each generated token's own text, and the texts of its top_logprobs' ids
    tokens: list[str] | None = None
    top_tokens: list[list[str]] | None = None
    prompt_logprobs: PromptLogprobs | None = None  # SamplingParams.prompt_logprobs

    @classmethod
    def of(cls, prompt, gen: Generation, texts: TokenText | None = None) -> GenerationResult:
        tokens = top_tokens = None
        if texts is not None and gen.logprobs is not None:
            tokens = [texts.text(t) for t in gen.token_ids]
        if texts is not None and gen.top_logprobs is not None:
            top_tokens = [[texts.text(t) for t, _ in row] for row in gen.top_logprobs]
        return cls(
            prompt if isinstance(prompt, str) else None,
            gen.prompt_token_ids,
            gen.text,
            gen.token_ids,
            gen.finish_reason,
            gen.stats,
            gen.logprobs,
            gen.top_logprobs,
            gen.cumulative_logprob,
            tokens,
            top_tokens,
            None
            if gen.prompt_logprobs is None
            else PromptLogprobs.of(gen.prompt_token_ids, gen.prompt_logprobs, texts),
        )

    def as_dict(self) -> dict:
        out = {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.as_dict(),
        }
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.tokens is not None:
            out["tokens"] = self.tokens
        if self.top_logprobs is not None:  # per alternative: [id, log-prob, its text] ([id, log-prob] without one)
            rows = []
            for i, row in enumerate(self.top_logprobs):
                texts = self.top_tokens[i] if self.top_tokens is not None else None
                rows.append([[t, lp, texts[j]] if texts else [t, lp] for j, (t, lp) in enumerate(row)])
            out["top_logprobs"] = rows
        if self.cumulative_logprob is not None:
            out["cumulative_logprob"] = self.cumulative_logprob
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs.as_dict()
        return out


def cpu_fallback_notice(device: str | torch.device, resolved: torch.device) -> None:
    """One INFO line (the CLI shows it) when device "auto" found no CUDA GPU: a user who expected the GPU learns
    why the run is slow. Logged as the weights start loading, so a refused option's error comes alone."""
    if str(device) == "auto" and resolved.type == "cpu":
        log.info(
            f"device 'auto' (--device auto) found no CUDA GPU visible to PyTorch (torch {torch.__version__}): "
            "running on the CPU, which is much slower"
        )


def resolve_device(device: str | torch.device) -> torch.device:
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CadenzaError(
            f"device={name!r} was asked for, but this PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}). Use device='cpu' (or 'auto'), or install a CUDA build of PyTorch."
        )
    if name != "cpu" and not name.startswith("cuda"):
        raise CadenzaError(f"Unknown device {name!r}. Use 'auto', 'cpu' or 'cuda'.")
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype | None, checkpoint: Checkpoint) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return checkpoint.torch_dtype()
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_NAMES.values():
            return dtype
    elif dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    elif dtype in ("fp32", "fp16", "bf16"):
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    raise CadenzaError(f"Unknown dtype {dtype!r}. Use one of: float32, float16, bfloat16 (or leave it unset).")


def _check_kv_place(kv_cache) -> None:
    if kv_cache not in ("gpu", "host"):
        raise CadenzaError(f"kv_cache={kv_cache!r} (--kv-cache) is not a place for the KV cache. Use gpu or host.")


def check_prefill_chunk(prefill_chunk, default: int = PREFILL_CHUNK) -> int:
    """prefill_chunk (--prefill-chunk): None -> `default`, else a whole number of tokens of at least 1."""
    if prefill_chunk is None:
        return default
    if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
        raise CadenzaError(
            f"prefill_chunk={prefill_chunk!r} (--prefill-chunk) is not valid. Use a whole number of tokens of at least "
            f"1 (default {default})."
        )
    return prefill_chunk


def check_micro_batches(micro_batches, kv_cache: str) -> None:
    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise CadenzaError(f"micro_batches={micro_batches!r} (--micro-batches) is not valid. Use 1, 2, ...")
    if micro_batches > 1 and kv_cache != "host":
        raise CadenzaError(
            f"micro_batches={micro_batches} (--micro-batches) overlaps the CPU's attention with the GPU's experts, "
            "which needs the KV cache in host memory: add kv_cache='host' (--kv-cache host), or use 1."
        )


class LLM:
    """A Mixture-of-Experts model loaded from a Hugging Face checkpoint folder, a GGUF file or a hub id.

    >>> llm = LLM("mistralai/Mixtral-8x7B-Instruct-v0.1")  # or a local folder: LLM("path/to/Mixtral-8x7B...")
    >>> llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8)).text

    model_dir: folder with config.json, *.safetensors and tokenizer files, a .gguf file, or a Hugging Face id
    "ORG/NAME", "ORG/NAME@REVISION", "ORG/NAME:FILE" (one GGUF model of a repository; cadenza.hub): a string that
    is no existing path resolves to the hub cache (HF_HUB_CACHE / HF_HOME), what is missing downloaded first
    (HF_TOKEN for gated models; HF_HUB_OFFLINE=1: the cache only). None loads the built-in demo model (tiny, trained
    on first use on a few paragraphs: it shows the engine working and tells one short story).
    device: "auto" (CUDA when available), "cpu" or "cuda". dtype: compute dtype, default the checkpoint's.
    max_context: the longest sequence (prompt + output) in tokens; default the model's context, at most
    8192 (the KV cache for it is reserved on the GPU).
    max_batch: sequences decoded together whose KV cache is reserved on the GPU (default 1; each costs a full
    context of KV cache out of the GPU budget). Batched generation, beams and the server use up to this many.
    kv_cache: where the KV cache lives on a GPU run: "gpu" (default; reserved in the budget, decode steps as CUDA
    graphs) or "host" (host memory, growing as it fills; attention runs on the CPU, so the budget goes to experts
    and a batch is bounded by host memory, not the GPU's: the offline mode's big batches; no CUDA graphs; not for
    DeepSeek's MLA cache). micro_batches: with kv_cache="host", a decode step's batch split in this many
    micro-batches decoded by their own threads, so that one's attention on the CPU overlaps another's experts on the
    GPU (default 1: none; 2 is the usual choice; a step of fewer than 8 rows each is not split).
    prefill_chunk: the most tokens one forward pass carries (a long prompt's chunks; in throughput mode the prompts
    prefilled together with the decoding rows), default 2048; the GPU reserves activation memory for that many. An
    offline job's passes that carry prompts each move the non-resident experts over the link once, so larger passes
    move them fewer times, at the cost of the residents the workspace displaces: `cadenza batch` uses 4096
    (cadenza.cli.batch.JOB_PREFILL_CHUNK): pass it to an LLM built for throughput-mode jobs.
    eviction: which fetched expert leaves a full fetch cache: "lru" (default), "lfu" or "lrfu".
    prefetch: guess the next layer's experts with its router and start their copies early: True, False, or None
    (default: with the fetch policy only). cuda_graphs: replay decode steps as CUDA graphs where possible
    (default; `engine.graphs.describe()` says whether and why not); False runs every step eagerly.
    experts: how routed experts are stored: "auto" (default: a GGUF's Q4_0 / Q4_K / Q6_K / MXFP4 expert blocks as
    they are, read by cadenza's kernels; otherwise as "bf16"), "bf16" (in the compute dtype), "int8" (symmetric,
    one scale per output channel, or per `expert_group` columns: 32, 64, 128) or "int4" (scale and zero point per
    `expert_group` columns: 32, 64 (default) or 128). Quantized experts take about 1/2 (int8) or 0.27 (int4) of
    bf16's bytes, so more of them fit on the GPU and the CPU reads each faster, at a small loss of accuracy. They
    are packed at load, layer by layer, and kept in a disk cache (`~/.cache/cadenza/experts`, see CADENZA_CACHE)
    that later loads read instead; expert_cache=False neither reads nor writes it.

    Offloading (on a CUDA device): gpu_memory is the GPU budget: text with a unit ("24GiB", "24GB", "512MiB"; a bare
    "24" is refused, as it would be 24 bytes), or an int, a number of bytes; 0 (or "0"): every routed expert on the
    host; default: the GPU's free memory less a safety margin. What every token needs stays on the GPU; routed
    experts fill the rest, most popular first (`placement`: a popularity JSON from `cadenza profile`), and the
    others are computed on the CPU or fetched per `offload_policy` ("auto", "cpu", "fetch"), with `cpu_threads`
    threads (default: physical cores). On device="cpu", a gpu_memory runs the same orchestration with the "GPU side"
    emulated on the CPU (for tests).

    Several GPUs: devices=[0, 1] (or "0,1", ["cuda:0", "cuda:1"]) splits the layers in contiguous blocks, one a GPU
    (a pipeline by layer: one small copy of the hidden state per boundary), each GPU's experts placed in its own
    budget (gpu_memory: one size for each, or one per GPU: ["24GiB", "16GiB"] or "24GiB,16GiB"); the CPU computes
    every GPU's host experts. Decode steps replay as CUDA graphs, one per GPU segment; the KV cache is on the GPUs.
    ["cpu", "cpu"] emulates the split on the CPU (for tests).
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        max_context: int | None = None,
        gpu_memory: str | int | None = None,
        offload_policy: str = "auto",
        cpu_threads: int | None = None,
        placement: str | Path | None = None,
        checkpoint=None,
        max_batch: int = 1,
        eviction: str = "lru",
        prefetch: bool | None = None,
        cuda_graphs: bool = True,
        experts: str = "auto",
        expert_group: int | None = None,
        expert_cache: bool = True,
        kv_cache: str = "gpu",
        micro_batches: int = 1,
        cpu_activations: str = "auto",
        devices=None,
        prefill_chunk: int | None = None,
    ):
        expert_format = ExpertFormat.of(experts, expert_group, expert_cache)  # before anything is read
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)
        _check_kv_place(kv_cache)  # (before the weights; the model's cache kind is checked once known)
        check_micro_batches(micro_batches, kv_cache)
        self.kv_cache, self.micro_batches = kv_cache, micro_batches
        self.is_demo = model_dir is None and checkpoint is None
        self._token_text: TokenText | None = None  # made at the first result with log-probs
        if checkpoint is None:
            if model_dir is None:
                from cadenza.demo import demo_model_dir

                model_dir = demo_model_dir()
            checkpoint = open_checkpoint(model_dir)
            self.tokenizer = open_tokenizer(checkpoint)
        else:  # a synthetic model (the bench): token ids in and out, no tokenizer
            self.tokenizer = None
        self.checkpoint = checkpoint
        self.devices = split_devices(devices, device, kv_cache)
        self.device = self.devices[0] if self.devices else resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.checkpoint)
        # refused before any weight is read (the environment's CADENZA_* overrides too)
        options = OffloadOptions(offload_policy, prefetch, eviction, cpu_threads, cpu_activations=cpu_activations)
        options = options.with_env()
        self.cpu_activations = options.cpu_activations
        meta = build_meta(self.checkpoint)
        self._edge_bytes = edge_bytes(meta, self.dtype)  # (before the blocks replace the LM head's weight)
        keep_dense_blocks(meta, self.checkpoint, self.device)  # a GGUF's attention weights, in their blocks on a GPU
        expert_format = expert_format.resolve(self.checkpoint, meta)
        config = self.config = meta.config
        self._kv_cache_kind = type(meta.new_cache(1, torch.float32, torch.device("meta")))
        self._check_kv_cache(kv_cache, type(meta).__name__)
        context, self.context_source, self._context_fix = self._context(max_context)
        self.max_context = context
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise CadenzaError(f"max_batch={max_batch!r} is not valid. Use a whole number of at least 1.")
        self.max_batch = max_batch
        self.expert_format = expert_format
        # a GPU run's token embedding table stays in host memory (loader.embedding_on_host; not over several GPUs)
        host_embedding = self.device.type == "cuda" and not self.devices and embedding_on_host(meta)
        self.sizes = model_sizes(
            meta, self.dtype, expert_format.fmt, expert_format.group, expert_format.layer_formats,
            host_embedding=host_embedding,
        )  # fmt: skip
        self.orchestra: Orchestra | None = None
        self.offload_policy = offload_policy
        self._popularity = None
        if self.devices and self.sizes.num_moe_layers == 0:
            raise CadenzaError(
                f"devices / --gpus splits the MoE layers over GPUs, and {model_dir} has none: use one GPU."
            )
        offload = self.sizes.num_moe_layers > 0 and (self.device.type == "cuda" or gpu_memory is not None)
        if placement is not None and not offload:
            why = (
                "the model has no MoE layers"
                if self.sizes.num_moe_layers == 0
                else f"this run has no GPU side (device {self.device.type}, and no gpu_memory / --gpu-memory)"
            )
            log.warning(
                f"placement {str(placement)!r} (--placement) is ignored: it chooses which experts live on the GPU, "
                f"and {why}. Run on a GPU (--device cuda), or give a GPU budget with --gpu-memory SIZE "
                "(on device cpu that emulates the GPU side); or drop --placement."
            )
        self.split: LayerSplit | None = None
        if self.devices:
            if placement is not None:
                self._popularity = load_popularity(placement, self.sizes.num_moe_layers, self.sizes.num_experts)
            shares = self._plan_split(gpu_memory, offload_policy)  # refuses too small budgets before reading weights
            self.split = LayerSplit.of(meta, self.devices, [s.stop - s.first for s in shares])
            self.split.apply(meta)  # (a GGUF's kept attention blocks move to their layers' GPUs too)
            self.model = load_model(
                self.checkpoint, self.device, self.dtype, torch.device("cpu"), meta, expert_format, self.split.device_of
            )
            self.orchestra = Stages(
                moe_layers(self.model), self.devices, self.split.moe_ranges, options, moe_routers(self.model)
            )
            weakref.finalize(self, self.orchestra.close)
            self.orchestra.apply(shares)
            self.orchestra.calibrate(self.dtype)
            log.info("layers split over %d devices: %s", len(self.devices), self.split.describe())
        elif offload:
            if placement is not None:
                self._popularity = load_popularity(placement, self.sizes.num_moe_layers, self.sizes.num_experts)
            planned = self._plan(gpu_memory, offload_policy)  # refuses a too-small budget before reading weights
            cpu_fallback_notice(device, self.device)
            host = torch.device("cpu")
            self.model = load_model(
                self.checkpoint, self.device, self.dtype, host, meta, experts=expert_format,
                device_of=(lambda n: host if n == EMBEDDING else self.device) if host_embedding else None,
            )  # fmt: skip
            if host_embedding:
                pinned, why = embedding_to_host(self.model, self.device)
                if pinned is not None:
                    weakref.finalize(self, pinned.release)
                    table = format_size(self.model.model.embed_tokens.host_table.nbytes)
                    log.info(f"token embedding table ({table}) in host memory, read by the GPU a row a token")
                else:
                    extra = format_size(self.model.model.embed_tokens.weight.nbytes)
                    log.warning(f"the token embedding table is on the GPU after all ({why}): {extra} more than planned")
            self.orchestra = Orchestra(moe_layers(self.model), self.device, options, moe_routers(self.model))
            # unpin host memory and stop the worker when this LLM is collected, even without close()
            weakref.finalize(self, self.orchestra.close)
            self.orchestra.apply(planned)
            calibration.calibrate(self.orchestra, self.device, self.dtype)
        else:
            if cpu_threads is not None:
                torch.set_num_threads(cpu_threads)
            cpu_fallback_notice(device, self.device)
            self.model = load_model(self.checkpoint, self.device, self.dtype, model=meta, experts=expert_format)
            for m in moe_layers(self.model):  # a CPU run's packed experts call the CPU kernel themselves
                m.cpu_activations = options.cpu_activations
        eos = set(config.eos_token_id)
        gen_eos = self.checkpoint.generation_config.get("eos_token_id")
        if gen_eos is not None:
            eos |= {gen_eos} if isinstance(gen_eos, int) else set(gen_eos)
        if not eos and self.tokenizer is not None:
            eos = set(self.tokenizer.eos_token_ids)
        self.engine = Engine(
            self.model,
            self.tokenizer,
            self.device,
            self.dtype,
            context,
            eos,
            self.orchestra,
            self.prefill_chunk,
            max_batch,
            cuda_graphs,
            context_source=self.context_source,
            context_fix=self._context_fix,
            kv_cache=kv_cache,
            micro_batches=micro_batches,
        )

    def _context(self, max_context: int | None) -> tuple[int, str, str]:
        """The context in tokens, where that limit comes from and how to raise it (for messages); says so when
        max_context asks for more than the model's context."""
        model = self.config.context_length
        if getattr(self.checkpoint, "metadata", None) is not None:
            source = "the GGUF file's context_length"
        elif self.config.rope.rope_type == "dynamic":
            source = "config.json's max_position_embeddings times its dynamic rope_scaling factor"
        else:
            source = "config.json's max_position_embeddings"
        if max_context is None:
            if model > DEFAULT_MAX_CONTEXT:
                return (
                    DEFAULT_MAX_CONTEXT,
                    f"cadenza's default of {DEFAULT_MAX_CONTEXT}; the model allows {model}, per {source}",
                    f"raise --max-context / max_context, up to the model's {model}",
                )
            return model, f"the model's context, from {source}", ""
        if not isinstance(max_context, int) or isinstance(max_context, bool) or max_context < 2:
            raise CadenzaError(f"max_context={max_context!r} is not a valid length. Use a whole number >= 2.")
        if max_context > model:
            log.warning(
                f"max_context {max_context} (--max-context) is beyond the model's context of {model} tokens "
                f"({source}): using {model}."
            )
            return model, f"the model's context, from {source}; --max-context {max_context} was capped to it", ""
        fix = f"raise --max-context / max_context, up to the model's {model}" if max_context < model else ""
        return max_context, "set by --max-context / max_context", fix

    def _room_notice(self, prompt_len: int, params: SamplingParams) -> str | None:
        """A notice when the prompt plus max_tokens does not fit the context (the output then ends at the context
        with finish_reason "length"); None when it fits."""
        if prompt_len + params.max_tokens <= self.max_context or prompt_len >= self.max_context:
            return None
        room = self.max_context - prompt_len
        fix = " or ".join(f for f in (self._context_fix, "shorten the prompt") if f)
        return (
            f"the prompt has {prompt_len} tokens and max_tokens (--max-tokens) asks for up to {params.max_tokens} "
            f"more, but the context is {self.max_context} tokens ({self.context_source}): at most {room} will be "
            f'generated (finish_reason "length"). To make room, {fix}; or lower max_tokens to {room} to silence this.'
        )

    def _check_room(self, prompt_ids: list[int], params: SamplingParams | None) -> None:
        notice = self._room_notice(len(prompt_ids), params or SamplingParams())
        if notice is not None:
            log.warning(notice)

    # --- offloading ------------------------------------------------------------------------------------------

    @property
    def placement(self) -> Placement | None:
        return self.orchestra.placement if self.orchestra is not None else None

    def _plan_split(self, gpu_memory, policy: str, popularity="loaded") -> list[DeviceShare]:
        """Several GPUs: each GPU's share (cadenza.moe.devices) for budgets and a policy; once the weights are
        placed, for their split. popularity as `_plan`'s."""
        popularity = self._popularity if isinstance(popularity, str) else popularity
        counts = list(self.split.counts) if getattr(self, "split", None) is not None else None
        return planning.plan_split(
            self.sizes, self.config, self.dtype, budgets_for(gpu_memory, self.devices), policy, self.max_context,
            self.max_batch, self.prefill_chunk, popularity, self.device.type == "cuda", self._edge_bytes, counts,
        )  # fmt: skip

    def _plan(self, gpu_memory, policy: str, popularity="loaded") -> Placement:
        """The placement for a budget and policy (several GPUs: their shares as one, gpu_memory each GPU's);
        popularity: "loaded" (the --placement file, if any), None (even placement) or a [layers][experts]
        matrix."""
        if self.devices:
            return merged(self._plan_split(gpu_memory, policy, popularity))
        popularity = self._popularity if isinstance(popularity, str) else popularity
        if gpu_memory is None:
            if self.device.type != "cuda":
                raise CadenzaError("gpu_memory is needed for the emulated GPU side on device='cpu'.")
            budget = planning.default_budget(self.device)
        else:
            budget = parse_size(gpu_memory)
        sizes = self.sizes
        if self.kv_cache == "host":  # nothing of the cache on the GPU: the budget goes to experts
            sizes = replace(sizes, kv_bytes_per_token=0)
        return planning.plan_offload(
            sizes,
            self.config,
            self.dtype,
            budget,
            policy,
            self.max_context,
            self.max_batch,
            self.prefill_chunk,
            popularity,
            cuda=self.device.type == "cuda",
            micro_batches=self.micro_batches,
        )

    def _check_kv_cache(self, kv_cache: str, model_name: str) -> None:
        _check_kv_place(kv_cache)
        if self.devices:
            split_devices(self.devices, "auto", kv_cache)
        kind = self._kv_cache_kind
        if kv_cache == "host" and not kind.hostable:
            raise CadenzaError(
                f"kv_cache='host' (--kv-cache host) needs ordinary keys and values; {model_name}'s attention cache is "
                f"its own ({kind.not_hostable_why}). Use --kv-cache gpu."
            )

    def replan(
        self,
        gpu_memory=None,
        offload_policy: str | None = None,
        max_batch: int | None = None,
        kv_cache: str | None = None,
        micro_batches: int | None = None,
    ) -> Placement:
        """Places the experts anew for another budget and/or policy, and optionally another max_batch, KV cache
        place and micro_batches (as the constructor's), without reloading weights (between requests). Returns the
        new placement."""
        if self.orchestra is None:
            raise CadenzaError("This model runs without offloading (device='cpu' and no gpu_memory): nothing to plan.")
        policy = offload_policy or self.offload_policy
        if policy not in POLICIES:
            raise CadenzaError(f"Unknown offload policy {policy!r}. Use one of: {', '.join(POLICIES)}.")
        if max_batch is not None or kv_cache is not None or micro_batches is not None:
            max_batch = self.max_batch if max_batch is None else max_batch
            kv_cache = self.kv_cache if kv_cache is None else kv_cache
            if micro_batches is None:  # (kept with a host cache; a GPU cache has none)
                micro_batches = self.micro_batches if kv_cache == "host" else 1
            if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
                raise CadenzaError(f"max_batch={max_batch!r} is not valid. Use a whole number of at least 1.")
            self._check_kv_cache(kv_cache, type(self.model).__name__)
            check_micro_batches(micro_batches, kv_cache)
            self.max_batch, self.kv_cache, self.micro_batches = max_batch, kv_cache, micro_batches
            self.engine.set_batch(max_batch, kv_cache, micro_batches)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the dropped reserved cache, before the new placement fills the budget
        planned = self._plan_split(gpu_memory, policy) if self.devices else self._plan(gpu_memory, policy)
        self.orchestra.apply(planned, policy)
        self.offload_policy = policy
        if isinstance(self.orchestra, Stages):
            self.orchestra.calibrate(self.dtype)
            return self.orchestra.placement
        calibration.calibrate(self.orchestra, self.device, self.dtype)
        return planned

    def adapt_placement(self, max_bytes: int = 2 * GiB) -> int:
        """Exchanges resident experts for ones live traffic uses more (between requests; never mid-step),
        copying at most max_bytes. Returns the number of experts exchanged."""
        if self.orchestra is None:
            return 0
        return len(self.orchestra.adapt(max_bytes))

    def close(self) -> None:
        """Stops the CPU worker and unpins host memory (also done when the LLM is collected); the LLM is unusable
        afterwards."""
        self.engine.micro.close()
        if self.orchestra is not None:
            self.orchestra.close()
            self.orchestra = None

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise CadenzaError(
            "A prompt must be a string or a list of token ids (ints); got a list holding "
            f"{type(next(t for t in prompt if not isinstance(t, int))).__name__}."
        )

    @staticmethod
    def _is_batch(prompts) -> bool:
        return not isinstance(prompts, str) and len(prompts) > 0 and not isinstance(prompts[0], int)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        mode: str = "together",
    ) -> GenerationResult | list[GenerationResult]:
        """Generates for one prompt (a string or a list of token ids) -> one result, or for a list of prompts ->
        a list of results in the same order. A list runs together, one token per step for all of them
        (`params` may then be one SamplingParams for all or one per prompt); greedy results equal each alone.
        mode="together" (default) starts every prompt of the list at once on the CPU (max_batch at a time on a
        GPU); mode="throughput" runs the list as `generate_iter` does (max_batch, or 16 on the CPU, at a time,
        shortest prompts of each window of 256 first) and returns the results in input order."""
        if mode not in ("together", "throughput"):
            raise CadenzaError(f'mode={mode!r} is not a generation mode. Use "together" (default) or "throughput".')
        if mode == "throughput" and self._is_batch(prompts):
            prompts = list(prompts)
            out: list[GenerationResult | None] = [None] * len(prompts)
            for i, result in self.generate_iter(prompts, params, sort_window=THROUGHPUT_WINDOW):
                out[i] = result
            return out
        if not self._is_batch(prompts):
            if not isinstance(params, SamplingParams | None):
                raise CadenzaError("One prompt takes one SamplingParams; pass a list of prompts for a list of params.")
            ids = self._prompt_ids(prompts)
            self._check_room(ids, params)
            gen = Generation(ids)
            for _ in self.engine.generate(ids, params or SamplingParams(), gen):
                pass
            return GenerationResult.of(prompts, gen, self._texts())
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts) or not all(isinstance(p, SamplingParams) for p in params):
            raise CadenzaError(
                f"{len(prompts)} prompts were given with {len(params)} sampling params. Pass one SamplingParams for "
                "all prompts, or a list of SamplingParams with one per prompt."
            )
        requests = [(self._prompt_ids(p), sp) for p, sp in zip(prompts, params, strict=True)]
        cut = [i for i, (ids, sp) in enumerate(requests) if self._room_notice(len(ids), sp) is not None]
        if cut:
            ids, sp = requests[cut[0]]
            log.warning(
                f"{len(cut)} of the {len(requests)} prompts do not leave room for max_tokens in the context; the "
                f"first, prompt {cut[0]}: {self._room_notice(len(ids), sp)}"
            )
        gens = self.engine.generate_many(requests)
        return [GenerationResult.of(p, g, self._texts()) for p, g in zip(prompts, gens, strict=True)]

    def generate_iter(
        self,
        prompts: Iterable[Prompt],
        params: SamplingParams | Iterable[SamplingParams] | None = None,
        max_batch: int | None = None,
        sort_window: int = 0,
    ) -> Iterator[tuple[int, GenerationResult]]:
        """Throughput mode for many prompts (an offline job): yields (index, result) as each prompt finishes, which
        is not input order; index is the prompt's position in `prompts`. `params` is one SamplingParams for all or
        an iterable with one per prompt.

        Prompts (and their params) are read lazily, as slots free up, and each result is handed over as soon as it
        is done, so a job of any length (a generator reading a file) runs in bounded memory. `max_batch` sequences
        decode together (default: this LLM's max_batch on a GPU, 16 on the CPU), refilled as they finish
        (continuous batching). `sort_window` > 1 reads that many prompts at a time and starts each window's
        shortest first (decode steps then span rows of similar lengths); results of a window may then finish
        further out of order. Greedy results equal each prompt run alone.

            for i, result in llm.generate_iter(prompts, SamplingParams(temperature=0, max_tokens=64)):
                print(i, result.text)
        """
        if max_batch is None:
            max_batch = self.max_batch if self.device.type == "cuda" else CPU_MAX_BATCH
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise CadenzaError(f"max_batch={max_batch!r} is not valid. Use a whole number of at least 1.")
        if params is None or isinstance(params, SamplingParams):
            each = itertools.repeat(params or SamplingParams())
        else:
            each = iter(params)
        given: dict[int, Prompt] = {}  # prompts in flight, for their results
        cut = 0

        def requests():
            nonlocal cut
            for i, prompt in enumerate(prompts):
                sp = next(each, None)
                if not isinstance(sp, SamplingParams):
                    raise CadenzaError(
                        f"Prompt {i} has no SamplingParams (got {type(sp).__name__}). Pass one SamplingParams for all "
                        "prompts, or one per prompt."
                    )
                ids = self._prompt_ids(prompt)
                notice = self._room_notice(len(ids), sp)
                if notice is not None:
                    cut += 1
                    if cut == 1:  # once: a job of thousands would repeat it thousands of times
                        log.warning(f"prompt {i}: {notice} (later prompts cut by the context are not reported)")
                given[i] = prompt
                yield i, ids, sp

        for i, gen in self.engine.run_many(requests(), max_batch, sort_window):
            yield i, GenerationResult.of(given.pop(i), gen, self._texts())

    def _texts(self) -> TokenText | None:
        """Token texts for log-probs (made once; None for a model without a tokenizer)."""
        if self.tokenizer is None:
            return None
        if self._token_text is None:
            self._token_text = TokenText(self.tokenizer)
        return self._token_text

    def default_params(self, **overrides) -> SamplingParams:
        """SamplingParams whose temperature, top_p, top_k, min_p and repetition_penalty default to the
        checkpoint's generation_config.json (as the model's authors recommend them), `overrides` on top."""
        recommended = {
            k: v
            for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
            if isinstance(v := self.checkpoint.generation_config.get(k), int | float) and not isinstance(v, bool)
        }
        return SamplingParams(**{**recommended, **overrides})

    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
        """The token ids of a conversation rendered with the checkpoint's chat template (a clear error when it has
        none). `extra` become template variables (e.g. enable_thinking=False)."""
        if self.tokenizer is None:
            raise CadenzaError("This model has no tokenizer (a synthetic model), so it cannot chat.")
        if isinstance(messages, dict | str) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            raise CadenzaError(
                'Chat messages must be a list of {"role": ..., "content": ...} dicts, e.g. '
                '[{"role": "user", "content": "Hello"}].'
            )
        if not messages:
            raise CadenzaError("The conversation is empty. Pass at least one message.")
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, **extra)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages: Sequence[dict], params: SamplingParams | None = None, **extra) -> GenerationResult:
        """The assistant's answer to a conversation ([{"role": "user", "content": "..."}, ...]), rendered with the
        checkpoint's chat template with the generation prompt added."""
        ids = self.chat_prompt(messages, **extra)
        self._check_room(ids, params)
        gen = Generation(ids)
        for _ in self.engine.generate(ids, params or SamplingParams(), gen):
            pass
        return GenerationResult.of(None, gen, self._texts())

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, gen: Generation | None = None
    ) -> Iterator[str]:
        """Yields text pieces as they are decoded; joined, they equal the full result's text (a stop string is
        never emitted, not even in part). Pass `gen` to receive token ids, finish reason and stats once the stream
        ends."""
        for step in self.stream_steps(prompt, params, gen):
            if step.text:
                yield step.text

    def stream_steps(
        self, prompt: Prompt, params: SamplingParams | None = None, gen: Generation | None = None
    ) -> Iterator[Step]:
        """`stream`'s steps: each generated token's id, the text it made final, and on the last the finish reason."""
        ids = self._prompt_ids(prompt)
        self._check_room(ids, params)
        gen = gen if gen is not None else Generation(ids)
        gen.prompt_token_ids = ids
        yield from self.engine.generate(ids, params or SamplingParams(), gen)

    def score(self, token_ids: Prompt) -> torch.Tensor:
        """Teacher-forced logits: float32 tensor [len(token_ids), vocab_size] (row i predicts token i + 1). A
        string is tokenized first."""
        return self.engine.score(self._prompt_ids(token_ids))

    def prompt_logprobs(self, prompt: Prompt, top: int = 0) -> PromptLogprobs:
        """How likely the model finds a text (a string or token ids): per token its log-probability given the
        tokens before it (log_softmax of `score`'s float32 logits; None for the first token), its rank and the
        `top` most likely alternatives (0 to MAX_TOP_LOGPROBS), with the tokens' texts.

        >>> llm.prompt_logprobs("The capital of France is Paris", top=2).logprobs[-1]
        """
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise CadenzaError(f"top={top!r} is not valid. Use a whole number from 0 to {MAX_TOP_LOGPROBS}.")
        ids = self._prompt_ids(prompt)
        scores = prompt_scores(self.score(ids), ids, top)
        return PromptLogprobs.of(ids, scores, self._texts())
