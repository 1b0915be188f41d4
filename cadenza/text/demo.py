"""A tiny byte-level tokenizer for the demo model: any text round-trips, no training, no download."""

from __future__ import annotations

import json
from pathlib import Path


def _byte_symbols() -> list[str]:
    """The 256 byte-level symbols, indexed by byte: printable Latin-1 bytes stand for themselves, the other bytes
    (controls, space, ...) for the characters from U+0100 on, in byte order (the GPT-2 byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


BYTE_LEVEL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYS] {{ message['content'] }} [/SYS]"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def write_byte_level_tokenizer(path: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json of a tiny byte-level tokenizer (no merges) into `path`.

    Ids: "<s>" = 0 (BOS, prepended by encode(add_special_tokens=True)), "</s>" = 1 (EOS), "<unk>" = 2, then byte
    b has id 3 + b; 259 ids in all. Any text round-trips. The chat template is "<s>[INST] user [/INST] answer</s>"
    style (a system message renders as "[SYS] ... [/SYS]").
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + _byte_symbols())}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 0)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "chat_template": BYTE_LEVEL_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
