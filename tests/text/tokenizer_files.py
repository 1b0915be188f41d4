"""Tiny tokenizer folders for tests, trained in-process (no downloads), deterministic and fast.

Import as `from tests.text.tokenizer_files import write_bpe_tokenizer, write_sentencepiece_tokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

# A small multilingual corpus: English, accented Latin text, CJK, emoji, code-ish text and numbers, so the trained
# merges cover multi-byte characters and the tests exercise tokens that split a character's UTF-8 bytes.
CORPUS: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "Mixture-of-experts models route every token to a few experts.",
    "The engine streams tokens as soon as they are decoded.",
    "I don't think it's raining, but we'll see what they're saying.",
    "def main():\n    print('hello, world')\n    return 0\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159",
    "Café, naïve, résumé, façade, déjà vu, crème brûlée.",
    "Élève, été, où, garçon, Noël, château, forêt.",
    "Über, schön, Straße, Mädchen, Grüße aus München.",
    "El niño comió piña en España; ¿qué tal?",
    "日本語のテキストです。東京は大きな都市です。",
    "日本語を話しますか？はい、少し話します。",
    "你好，世界！我们今天学习中文。",
    "中文和日本語の文字が混ざっています。",
    "한국어 문장도 조금 있습니다.",
    "Emoji: 🙂 👍 👍🏽 🎉 🚀 ❤️ 😀😀 🙂🙂",
    "Thanks 👍🏽 see you 🙂 soon 🎉!",
    "Привет, мир! Как дела?",
    "Γειά σου κόσμε.",
]


# SentencePiece counts every character of its training text as required (byte fallback + 3 specials already take
# 259 of ~300 ids), so its corpus uses a small alphabet; everything else (capitals, digits, CJK, emoji) is encoded
# through the <0xXX> byte pieces, which is exactly what the streaming tests want to exercise.
SMALL_ALPHABET_CORPUS: list[str] = [
    "the cat sat on the mat",
    "hello there, the café is on the hat",
    "then the rat ate the oats at home",
    "so the cat and the rat are at the café",
]


def _corpus(repeat: int = 3) -> list[str]:
    # Repetition gives the frequent pairs stable counts; the order is fixed, so training is deterministic.
    return CORPUS * repeat


MISTRAL_LIKE_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = none %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is not none %}"
    "{{ '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


def write_bpe_tokenizer(path: Path, vocab_size: int = 320, chat_template: bool = True) -> int:
    """Train a byte-level BPE tokenizer and write `tokenizer.json` + `tokenizer_config.json` into `path`.

    Special tokens: "<s>" = 0 (BOS, prepended by the post-processor), "</s>" = 1 (EOS), "<unk>" = 2; then the 256
    byte-level symbols, then merges up to `vocab_size` (which must be >= 259). Returns the real vocab size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 259:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 259 (3 special + 256 byte symbols), got {vocab_size}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    tok.save(str(path / "tokenizer.json"))
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    if chat_template:
        config["chat_template"] = MISTRAL_LIKE_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)


def write_sentencepiece_tokenizer(path: Path, vocab_size: int = 300) -> int:
    """Train a tiny Llama-style SentencePiece BPE (byte fallback) and write `tokenizer.model` + `tokenizer_config.json`.

    No tokenizer.json is written. Ids: "<unk>" = 0, "<s>" = 1 (BOS, added by encode), "</s>" = 2, then the 256 byte
    pieces "<0x00>".."<0xFF>", then learned pieces and characters. `vocab_size` must be >= 280. Returns the real vocab
    size (<= `vocab_size`).
    """
    import io

    import sentencepiece as spm

    if vocab_size < 280:
        raise ValueError(
            f"vocab_size must be >= 280 (259 special and byte pieces, 17 characters, merges), got {vocab_size}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SMALL_ALPHABET_CORPUS * 5),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a smaller vocabulary than asked for is fine; a larger one never happens
        byte_fallback=True,  # characters outside the vocabulary encode as <0xXX> pieces, so any text encodes
        character_coverage=1.0,
        # Llama's settings: no normalization, keep whitespace as is, a dummy "▁" prefix, digits split.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "legacy": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return sp.get_piece_size()
