"""cadenza: Mixture-of-Experts language models larger than the GPU's memory, on one machine.

from cadenza import LLM, SamplingParams
llm = LLM("path/to/checkpoint")          # a Hugging Face folder: config.json, *.safetensors, tokenizer
print(llm.generate("Hello", SamplingParams(temperature=0, max_tokens=32)).text)
"""

import importlib
import os
import sys
from typing import TYPE_CHECKING

import cadenza.log  # noqa: F401  (first: notices raised while the package loads reach stderr)
from cadenza.errors import CadenzaError

if TYPE_CHECKING:
    from cadenza.llm import LLM, GenerationResult
    from cadenza.sampling import SamplingParams

__version__ = "0.1.0"


# what cadenza put into its own environment at import (not the user): another program it starts, such as a peer that
# `cadenza bench` measures beside it, gets the environment without these (`foreign_environment`)
SET_AT_IMPORT: dict[str, str] = {}


def openmp_wait_default(environ, torch_loaded: bool, gpu: bool, record: dict | None = None) -> None:
    """GOMP_SPINCOUNT=10000 unless set, where a GPU is present and libgomp not yet loaded (it reads its environment
    once): the CPU kernel's OpenMP team spins ~0.5-1 ms after a job before it sleeps, so the next layer's job and its
    barriers find it awake, and a pause longer than that (the GPU's resident layers, an idle server) costs no core.
    The H200 box's sweep (session 23, engine_gap.py VARIANTS=spin, 0 ... 300000): Mixtral Q4_K_M with every expert on
    the host decoded 11.38 tok/s at 0, 13.19 at 10000, 12.52 at libgomp's own 300000; Qwen3-30B-A3B at 8 GiB 56.85,
    60.14, 62.93 (its ~0.4 ms layer jobs each woke a sleeping team at 0). Not on a CPU-only machine: nothing there
    waits for a GPU between the CPU's parallel regions. record: where to note what was set."""
    if gpu and not torch_loaded and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = "10000"
        if record is not None:
            record["GOMP_SPINCOUNT"] = "10000"


def foreign_environment(environ=None) -> dict[str, str]:
    """The environment (default os.environ) less what cadenza set for itself at import: for another program, which
    should run as its own users run it (llama.cpp's OpenMP threads under GOMP_SPINCOUNT=0 decoded Qwen3-30B-A3B
    ~30% slower on the box: session 21)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if SET_AT_IMPORT.get(k) != v}


openmp_wait_default(os.environ, "torch" in sys.modules, os.path.exists("/dev/nvidiactl"), SET_AT_IMPORT)

# LLM and co. import torch: they load on first use (PEP 562), so `cadenza --help` and `import cadenza.cli` stay fast
_LAZY = {"LLM": "cadenza.llm", "GenerationResult": "cadenza.llm", "SamplingParams": "cadenza.sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cadenza' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "GenerationResult", "CadenzaError", "__version__"]
