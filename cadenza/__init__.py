"""cadenza: Mixture-of-Experts language models larger than the GPU's memory, on one machine.

from cadenza import LLM, SamplingParams
llm = LLM("path/to/checkpoint")          # a Hugging Face folder: config.json, *.safetensors, tokenizer
print(llm.generate("Hello", SamplingParams(temperature=0, max_tokens=32)).text)
"""

import importlib
from typing import TYPE_CHECKING

import cadenza.log  # noqa: F401  (first: notices raised while the package loads reach stderr)
from cadenza.errors import CadenzaError

if TYPE_CHECKING:
    from cadenza.llm import LLM, GenerationResult
    from cadenza.sampling import SamplingParams

__version__ = "0.1.0"

# LLM and co. import torch: they load on first use (PEP 562), so `cadenza --help` and `import cadenza.cli` stay fast
_LAZY = {"LLM": "cadenza.llm", "GenerationResult": "cadenza.llm", "SamplingParams": "cadenza.sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cadenza' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "GenerationResult", "CadenzaError", "__version__"]
