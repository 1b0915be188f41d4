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


def openmp_wait_default(environ, torch_loaded: bool, gpu: bool) -> None:
    """GOMP_SPINCOUNT=0 unless set, where a GPU is present and libgomp not yet loaded (it reads its environment
    once): the CPU kernel's OpenMP team and PyTorch's own then sleep as soon as their work ends, instead of spinning
    ~0.3 ms beside each other and the handoff worker between a decode step's layers. On the H200 box (16 cores,
    session 20) that took a Mixtral Q4_K_M decode with every expert on the host from 10.6 to 11.5 tok/s (the CPU's
    share 85.6 -> 93.5 GB/s). Not on a CPU-only machine: PyTorch's many short parallel regions there would each pay
    a wake-up."""
    if gpu and not torch_loaded:
        environ.setdefault("GOMP_SPINCOUNT", "0")


openmp_wait_default(os.environ, "torch" in sys.modules, os.path.exists("/dev/nvidiactl"))

# LLM and co. import torch: they load on first use (PEP 562), so `cadenza --help` and `import cadenza.cli` stay fast
_LAZY = {"LLM": "cadenza.llm", "GenerationResult": "cadenza.llm", "SamplingParams": "cadenza.sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cadenza' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "GenerationResult", "CadenzaError", "__version__"]
