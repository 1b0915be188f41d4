"""Tokenizer.from_gguf against transformers' GGUF tokenizer, on tiny GGUF files holding only a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cadenza.errors import CadenzaError
from cadenza.text import Tokenizer
from cadenza.text.gguf import CONTROL, USER_DEFINED, gguf_metadata
from tests.formats.gguf_files import add_plain
from tests.text.test_tokenizer import TEXTS, assert_same_vocabulary, random_texts, stream
from tests.text.tokenizer_files import write_bpe_tokenizer, write_sentencepiece_tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

# Tokens appended to the trained vocabularies: a control token (special) and a user-defined one (matched whole, not
# special). "<|endoftext|>" is there because transformers' GPT-2-based GGUF tokenizers add it when it is missing.
# "<｜end▁of▁sentence｜>" (DeepSeek's spelling) is outside the byte alphabet: a byte-level vocabulary respells it
# and, as transformers does, does not make it special.
EXTRA = [
    ("<|im_start|>", CONTROL),
    ("<|endoftext|>", CONTROL),
    ("<think>", USER_DEFINED),
    ("<｜end▁of▁sentence｜>", CONTROL),
]
GGUF_TEXTS = [
    *TEXTS,
    "<|im_start|>user\nhi 🙂<|endoftext|>\n",
    "a<think>b</think> c",
    "numbers 1234567 and 3.14159",
    "tabs\tand\r\nwindows lines",
    "  <|im_start|>  ",
    "done<｜end▁of▁sentence｜>",
]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"


def write_gguf(path: Path, arch: str, kv: dict, n_tokens: int) -> None:
    """A GGUF with `kv` as metadata, the few keys transformers needs to read a config, and one tiny tensor."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    for key, value in kv.items():
        add_plain(writer, key, value)
    import numpy as np

    writer.add_tensor("token_embd.weight", np.zeros((n_tokens, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def bpe_kv(folder: Path, pre: str) -> dict:
    """GGUF tokenizer metadata of the byte-level BPE that tokenizer_files trains: vocab, merges, types."""
    write_bpe_tokenizer(folder)
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    types = [CONTROL] * 3 + [1] * (len(tokens) - 3)  # <s>, </s>, <unk> first
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens + [t for t, _ in EXTRA],
        "tokenizer.ggml.token_type": types + [k for _, k in EXTRA],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": len(tokens) + 1,
        "tokenizer.ggml.unknown_token_id": 2,
        "tokenizer.ggml.padding_token_id": len(tokens) + 1,
        "tokenizer.chat_template": TEMPLATE,
    }


def spm_kv(folder: Path) -> dict:
    """GGUF tokenizer metadata of the SentencePiece model tokenizer_files trains: pieces, scores, types (bytes too)."""
    from sentencepiece import sentencepiece_model_pb2

    write_sentencepiece_tokenizer(folder)
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString((folder / "tokenizer.model").read_bytes())
    tokens = [p.piece for p in model.pieces]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens + [t for t, _ in EXTRA],
        "tokenizer.ggml.scores": [p.score for p in model.pieces] + [0.0] * len(EXTRA),
        "tokenizer.ggml.token_type": [int(p.type) for p in model.pieces] + [k for _, k in EXTRA],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


# name: (architecture, metadata builder, extra metadata)
CASES = {
    "spm": ("llama", spm_kv, {}),
    "spm-eos": ("llama", spm_kv, {"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True}),
    "qwen2": ("qwen2", lambda f: bpe_kv(f, "qwen2"), {}),
    "qwen2-bos": ("qwen2", lambda f: bpe_kv(f, "qwen2"), {"tokenizer.ggml.add_bos_token": True}),
    "llama-bpe": ("llama", lambda f: bpe_kv(f, "llama-bpe"), {"tokenizer.ggml.add_bos_token": True}),
    **{pre: ("llama", lambda f, pre=pre: bpe_kv(f, pre), {}) for pre in ("gpt-2", "default", "olmo", "dbrx")},
    **{pre: ("llama", lambda f, pre=pre: bpe_kv(f, pre), {}) for pre in ("qwen35", "tekken", "gpt-4o")},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, (arch, build, extra) in CASES.items():
        kv = {**build(root / f"src-{name}"), **extra}
        write_gguf(root / f"{name}.gguf", arch, kv, len(kv["tokenizer.ggml.tokens"]))
        out[name] = root / f"{name}.gguf"
    return out


def load_both(file: Path):
    ours = Tokenizer.from_gguf(gguf_metadata(gguf.GGUFReader(str(file))), str(file))
    return ours, transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)


@pytest.mark.parametrize("name", CASES)
def test_gguf_loading_matches_transformers(files: dict[str, Path], name: str) -> None:
    assert_same_vocabulary(*load_both(files[name]))


@pytest.mark.parametrize("name", CASES)
def test_gguf_encode_decode_stream_match_transformers(files: dict[str, Path], name: str) -> None:
    ours, hf = load_both(files[name])
    for text in GGUF_TEXTS + random_texts(100):
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (text, add)
            for skip in (True, False):
                decoded = ours.decode(ids, skip_special_tokens=skip)
                assert decoded == hf.decode(ids, skip_special_tokens=skip), (text, skip)
                assert "".join(stream(ours.detokenizer(skip), ids)) == decoded, (text, skip)


def test_gguf_user_defined_token_is_whole_and_not_special(files: dict[str, Path]) -> None:
    ours, _ = load_both(files["qwen2"])
    think = ours.encode("<think>", add_special_tokens=False)
    assert len(think) == 1 and think[0] not in ours.special_token_ids
    assert ours.decode(ours.encode("a<|im_start|>b", add_special_tokens=False)) == "ab"


def test_gguf_chat_template(files: dict[str, Path]) -> None:
    ours, hf = load_both(files["qwen2"])
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == hf.apply_chat_template(
        messages, tokenize=False
    )
    spm, _ = load_both(files["spm"])
    with pytest.raises(CadenzaError, match="no chat template .no tokenizer.chat_template in its metadata"):
        spm.apply_chat_template(messages)


def test_gguf_metadata_reads_plain_values(files: dict[str, Path]) -> None:
    meta = gguf_metadata(gguf.GGUFReader(str(files["spm"])))
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert isinstance(meta["tokenizer.ggml.scores"][5], float)
    assert meta["tokenizer.ggml.bos_token_id"] == 1
    assert not any(key.startswith("GGUF.") for key in meta)


BASE = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
NO_MERGES = {k: v for k, v in BASE.items() if k != "tokenizer.ggml.merges"}


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({**BASE, "tokenizer.ggml.model": "bert"}, r"tokenizer.ggml.model is 'bert'.*'llama'.*'gpt2'"),
        ({**BASE, "tokenizer.ggml.model": "t5"}, r"'t5'"),
        ({k: v for k, v in BASE.items() if k != "tokenizer.ggml.model"}, r"no tokenizer.ggml.model"),
        ({k: v for k, v in BASE.items() if k != "tokenizer.ggml.tokens"}, r"no tokenizer.ggml.tokens"),
        (NO_MERGES, r"no tokenizer.ggml.merges"),
        ({**BASE, "tokenizer.ggml.pre": "deepseek-v3"}, r"'deepseek-v3'.*supported: .*qwen2"),
        ({**BASE, "tokenizer.ggml.bos_token_id": 7}, r"bos_token_id is 7, outside"),
        ({**BASE, "tokenizer.ggml.add_bos_token": True}, r"names no bos_token"),
        ({**NO_MERGES, "tokenizer.ggml.model": "llama"}, r"no tokenizer.ggml.scores"),
        ({**BASE, "tokenizer.ggml.model": "llama", "general.architecture": "gemma3"}, r"'gemma3'"),
    ],
)
def test_gguf_errors_name_file_problem_and_fix(meta: dict, match: str) -> None:
    with pytest.raises(CadenzaError, match=match) as info:
        Tokenizer.from_gguf(meta, "/models/x.gguf")
    assert "/models/x.gguf" in str(info.value)


def test_gguf_tiny_vocabularies_build_from_plain_dicts() -> None:
    tok = Tokenizer.from_gguf(BASE, "mem")
    assert tok.encode("ab") == [2]
    assert tok.decode([0, 1]) == "ab"
    # A "llama" vocabulary adds a BOS by default, but only when the file names one.
    tokens = ["<s>", "▁", "a", "b", "▁a", "▁ab"]
    scores = [0.0] * 4 + [1.0, 2.0]
    spm = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores}
    assert Tokenizer.from_gguf(spm, "mem").encode("ab") == [5]
    assert Tokenizer.from_gguf({**spm, "tokenizer.ggml.bos_token_id": 0}, "mem").encode("ab") == [0, 5]
