"""Text in and out of the model: tokenizers, chat templates, streaming detokenization and stop strings.

from cadenza.text import Tokenizer
tok = Tokenizer.from_dir("path/to/checkpoint")    # tokenizer.json, else tokenizer.model, + tokenizer_config.json
ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]), add_special_tokens=False)
"""

from cadenza.text.demo import write_byte_level_tokenizer
from cadenza.text.detokenizer import IncrementalDetokenizer
from cadenza.text.stops import StopStrings
from cadenza.text.token_text import TokenText
from cadenza.text.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopStrings", "TokenText", "Tokenizer", "write_byte_level_tokenizer"]
