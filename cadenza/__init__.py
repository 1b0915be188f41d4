"""cadenza: Mixture-of-Experts language models larger than the GPU's memory, on one machine.

from cadenza import LLM, SamplingParams
llm = LLM("path/to/checkpoint")          # a Hugging Face folder: config.json, *.safetensors, tokenizer
print(llm.generate("Hello", SamplingParams(temperature=0, max_tokens=32)).text)
"""

import cadenza.log  # noqa: F401  (first: notices raised while the package loads reach stderr)
from cadenza.errors import CadenzaError
from cadenza.llm import LLM, GenerationResult  # noqa: E402
from cadenza.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "GenerationResult", "CadenzaError", "__version__"]
