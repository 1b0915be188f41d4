"""The public Python API: `LLM` loads a checkpoint folder and generates; see `cadenza/__init__.py`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cadenza.checkpoint import DTYPE_NAMES, Checkpoint
from cadenza.engine import Engine, Generation, GenerationStats
from cadenza.errors import CadenzaError
from cadenza.models import load_model
from cadenza.sampling import SamplingParams
from cadenza.tokenizer import Tokenizer

Prompt = str | Sequence[int]


@dataclass
class GenerationResult:
    """What `LLM.generate` returns for one prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence or a stop token) or "length" (max_tokens or the context)
    stats: GenerationStats

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.as_dict(),
        }


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


class LLM:
    """A Mixture-of-Experts model loaded from a Hugging Face checkpoint folder.

    >>> llm = LLM("path/to/Mixtral-8x7B-Instruct-v0.1")
    >>> llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8)).text

    model_dir: folder with config.json, *.safetensors and tokenizer files; None loads the built-in demo model
    (small, random weights: it shows the engine working, its text is gibberish).
    device: "auto" (CUDA when available), "cpu" or "cuda". dtype: compute dtype, default the checkpoint's.
    max_context: the longest sequence (prompt + output) in tokens; default the model's max_position_embeddings.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        max_context: int | None = None,
    ):
        self.is_demo = model_dir is None
        if model_dir is None:
            from cadenza.demo import demo_model_dir

            model_dir = demo_model_dir()
        self.checkpoint = Checkpoint(model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.checkpoint)
        self.tokenizer = Tokenizer.from_dir(self.checkpoint.path)
        self.model = load_model(self.checkpoint, self.device, self.dtype)
        config = self.model.config
        context = config.context_length
        if max_context is not None:
            if not isinstance(max_context, int) or max_context < 2:
                raise CadenzaError(f"max_context={max_context!r} is not a valid length. Use a whole number >= 2.")
            context = min(context, max_context)
        eos = set(config.eos_token_id)
        gen_eos = self.checkpoint.generation_config.get("eos_token_id")
        if gen_eos is not None:
            eos |= {gen_eos} if isinstance(gen_eos, int) else set(gen_eos)
        if not eos:
            eos = set(self.tokenizer.eos_token_ids)
        self.engine = Engine(self.model, self.tokenizer, self.device, self.dtype, context, eos)

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
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None
    ) -> GenerationResult | list[GenerationResult]:
        """Generates for one prompt (a string or a list of token ids) -> one result, or for a list of prompts ->
        a list of results in the same order."""
        params = params or SamplingParams()
        if self._is_batch(prompts):
            return [self._generate_one(p, params) for p in prompts]
        return self._generate_one(prompts, params)

    def _generate_one(self, prompt: Prompt, params: SamplingParams) -> GenerationResult:
        ids = self._prompt_ids(prompt)
        gen = Generation(ids)
        for _ in self.engine.generate(ids, params, gen):
            pass
        return GenerationResult(
            prompt if isinstance(prompt, str) else None, ids, gen.text, gen.token_ids, gen.finish_reason, gen.stats
        )

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, gen: Generation | None = None
    ) -> Iterator[str]:
        """Yields text pieces as they are decoded; joined, they equal the full result's text. Pass `gen` to
        receive token ids, finish reason and stats once the stream ends."""
        ids = self._prompt_ids(prompt)
        gen = gen if gen is not None else Generation(ids)
        gen.prompt_token_ids = ids
        for step in self.engine.generate(ids, params or SamplingParams(), gen):
            if step.text:
                yield step.text

    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced logits: float32 tensor [len(token_ids), vocab_size]."""
        return self.engine.score(self._prompt_ids(token_ids))
