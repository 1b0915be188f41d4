"""cadenza.text.Tokenizer against transformers' AutoTokenizer on the same (tiny, trained-in-test) tokenizer folders."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest

from cadenza.errors import CadenzaError
from cadenza.text import IncrementalDetokenizer, Tokenizer, write_byte_level_tokenizer
from tests.text.tokenizer_files import CORPUS, SMALL_ALPHABET_CORPUS, write_bpe_tokenizer, write_sentencepiece_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    " ",
    "\n",
    "Hello the cat",
    " Hello",
    "  two leading spaces",
    "trailing space ",
    "a\n\nb\n",
    "the cat sat on the mat",
    "café crème brûlée, naïve résumé",
    "日本語のテキスト",
    "你好，世界！",
    "🙂👍🏽 emoji 🎉",
    "mixed é日本🙂 text\nwith lines",
    "I don't think it's here.",
    "<s>[INST] hi [/INST]",
    "x</s> y",
    "<unk> and <s>",
    "▁literal metaspace",
    *CORPUS,
]
KINDS = ["bpe", "spm"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    write_bpe_tokenizer(root / "bpe")
    write_sentencepiece_tokenizer(root / "spm")
    write_byte_level_tokenizer(root / "byte")
    return {"bpe": root / "bpe", "spm": root / "spm", "byte": root / "byte"}


def load_both(folder: Path):
    return Tokenizer.from_dir(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = [*"the cat sat on a mat éü日本語🙂👍🏽\n  .,'", "<s>", "</s>", "[INST]", " don't"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(count)]


def assert_same_vocabulary(ours, hf) -> None:
    """cadenza's tokenizer has transformers' vocabulary size, BOS and EOS ids, and special tokens (also GGUF's:
    tests/text/test_gguf_tokenizer.py)."""
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_ids == [hf.eos_token_id]
    assert ours.special_token_ids == {i for i, t in hf.added_tokens_decoder.items() if t.special}


@pytest.mark.parametrize("kind", KINDS)
def test_loading_matches_transformers(folders: dict[str, Path], kind: str) -> None:
    assert_same_vocabulary(*load_both(folders[kind]))


def test_sentencepiece_folder_is_loaded_by_transformers_from_tokenizer_model(folders: dict[str, Path]) -> None:
    # The comparisons below are only meaningful if transformers really converted tokenizer.model itself. (There is no
    # config.json here on purpose: with model_type "mixtral", transformers 5.23 ignores tokenizer_class and builds a
    # generic tokenizer from tokenizer.model that drops the "▁" dummy prefix.)
    assert not (folders["spm"] / "tokenizer.json").exists()
    hf = transformers.AutoTokenizer.from_pretrained(str(folders["spm"]))
    assert type(hf).__name__ == "LlamaTokenizer"
    assert hf.encode("Hello")[0] == hf.bos_token_id == 1


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_match_transformers(folders: dict[str, Path], kind: str) -> None:
    ours, hf = load_both(folders[kind])
    for text in TEXTS + random_texts(200):
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (text, add)
            assert ids == hf(text, add_special_tokens=add)["input_ids"]
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (
                    text,
                    skip,
                )


@pytest.mark.parametrize("kind", KINDS)
def test_decode_of_arbitrary_ids_matches_transformers(folders: dict[str, Path], kind: str) -> None:
    # Generated ids need not form valid UTF-8 (a lone continuation byte) nor avoid special tokens.
    ours, hf = load_both(folders[kind])
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
            assert "".join(stream(ours.detokenizer(skip), ids)) == ours.decode(ids, skip), ids


IM_TOKENS = {
    "300": {"content": "<|im_start|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False},
    "301": {"content": "<|im_end|>", "special": True, "lstrip": True, "rstrip": True, "normalized": False},
    "302": {"content": "[TOOL]", "special": False, "lstrip": False, "rstrip": False, "normalized": False},
}
IM_TEXTS = ["<|im_start|>user\nhi 🙂<|im_end|>\n<|im_start|>assistant\n", "a [TOOL]b", " <|im_end|> x  <|im_end|>"]
CONFIG_VARIANTS = {
    "spm": [
        {"legacy": True},  # "▁" before the text after every added token
        {"add_prefix_space": False},
        {"add_eos_token": True},
        {"add_bos_token": False},
        {"added_tokens_decoder": IM_TOKENS, "pad_token": "<pad>"},  # ids past the model's, lstrip/rstrip
    ],
    "bpe": [
        {"add_bos_token": False, "add_eos_token": True},  # ignored: tokenizer.json's post-processor decides
        {"added_tokens_decoder": {**IM_TOKENS, "1": {"content": "</s>", "special": False}}},  # re-flagged
        {"eos_token": "<|eot|>", "pad_token": "<pad>"},  # named tokens missing from the vocabulary are added
    ],
}


@pytest.mark.parametrize(
    ("kind", "changes"), [(kind, changes) for kind, variants in CONFIG_VARIANTS.items() for changes in variants]
)
def test_config_variants_match_transformers(folders: dict[str, Path], tmp_path: Path, kind: str, changes: dict) -> None:
    shutil.copytree(folders[kind], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))
    ours, hf = load_both(tmp_path)
    assert (ours.vocab_size, ours.bos_token_id, ours.eos_token_ids) == (len(hf), hf.bos_token_id, [hf.eos_token_id])
    assert ours.special_token_ids == {i for i, t in hf.added_tokens_decoder.items() if t.special}
    for text in TEXTS[:20] + IM_TEXTS + random_texts(30, seed=3):
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert "".join(stream(ours.detokenizer(), ids)) == ours.decode(ids)


def test_sentencepiece_normalization_rule_is_ignored_like_transformers(tmp_path: Path) -> None:
    # transformers' conversion drops the model's normalizer (here nmt_nfkc, which also collapses spaces): so do we.
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SMALL_ALPHABET_CORPUS), model_writer=model, model_type="bpe", vocab_size=280,
        hard_vocab_limit=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
    )  # fmt: skip
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    ours, hf = load_both(tmp_path)
    for text in ["the  cat  ", " x", "ｈｅｌｌｏ ｔｈｅ ①ﬁ", "\t\u3000x", *TEXTS[:10]]:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)


def test_plain_normalizer_drops_only_the_normalization(folders: dict[str, Path]) -> None:
    from sentencepiece import sentencepiece_model_pb2

    from cadenza.text.sentencepiece import plain_normalizer

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString((folders["spm"] / "tokenizer.model").read_bytes())
    model.normalizer_spec.name, model.normalizer_spec.escape_whitespaces = "nmt_nfkc", False
    model.normalizer_spec.precompiled_charsmap, model.normalizer_spec.normalization_rule_tsv = b"\x00", "41\t61"
    plain = sentencepiece_model_pb2.ModelProto()
    plain.ParseFromString(plain_normalizer(model.SerializeToString()))
    spec = plain.normalizer_spec
    assert (spec.name, spec.add_dummy_prefix, spec.remove_extra_whitespaces) == ("identity", False, False)
    assert not spec.HasField("precompiled_charsmap") and not spec.HasField("normalization_rule_tsv")
    assert not spec.escape_whitespaces and plain.pieces == model.pieces and plain.trainer_spec == model.trainer_spec
    model.ClearField("normalizer_spec")  # nothing to change: the model is passed on as it is
    assert plain_normalizer(model.SerializeToString()) == model.SerializeToString()


def test_llama_style_tokenizer_json_matches_the_sentencepiece_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    # transformers' own conversion of tokenizer.model, saved as tokenizer.json (ByteFallback decoder, Metaspace).
    transformers.AutoTokenizer.from_pretrained(str(folders["spm"])).save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").exists() and not (tmp_path / "tokenizer.model").exists()
    (from_json, hf), from_model = load_both(tmp_path), Tokenizer.from_dir(folders["spm"])
    for text in TEXTS + random_texts(50, seed=4):
        assert from_json.encode(text) == from_model.encode(text) == hf.encode(text), text
    rng = random.Random(5)
    for _ in range(200):
        ids = [rng.randrange(from_json.vocab_size) for _ in range(rng.randint(1, 15))]
        for skip in (True, False):
            assert from_json.decode(ids, skip) == from_model.decode(ids, skip) == hf.decode(ids, skip), ids
            assert "".join(stream(from_json.detokenizer(skip), ids)) == hf.decode(ids, skip), ids


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [True, False])
def test_streaming_equals_decode(folders: dict[str, Path], kind: str, skip: bool) -> None:
    tok = Tokenizer.from_dir(folders[kind])
    eos = tok.eos_token_ids[0]
    for text in TEXTS + random_texts(100, seed=2):
        ids = tok.encode(text) + [eos] + tok.encode(" and more 🙂", add_special_tokens=False)
        pieces = stream(tok.detokenizer(skip_special_tokens=skip), ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), (text, pieces)
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces), (text, pieces)


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_splits_characters_across_tokens(folders: dict[str, Path], kind: str) -> None:
    # Check the tests above really cover a character whose UTF-8 bytes are spread over several tokens.
    tok = Tokenizer.from_dir(folders[kind])
    ids = tok.encode("日本語 🙂👍🏽", add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces = stream(tok.detokenizer(), ids)
    assert "" in pieces[:-1]  # some add() had to wait for the rest of a character
    assert "".join(pieces) == "日本語 🙂👍🏽"


def test_streaming_keeps_sentencepiece_leading_space_as_decode_does(folders: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(folders["spm"])
    for text, skip in [("Hello the cat", True), ("Hello the cat", False), (" Hello", True), (" Hello", False)]:
        ids = tok.encode(text)
        pieces = [p for p in stream(tok.detokenizer(skip), ids) if p]
        full = tok.decode(ids, skip)
        assert "".join(pieces) == full
        assert full.startswith(pieces[0])  # the first piece neither gains nor loses a space
    assert tok.decode(tok.encode("Hello the cat"), False).startswith("<s> Hello")


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_decodes_a_small_window(folders: dict[str, Path], kind: str) -> None:
    tok = Tokenizer.from_dir(folders[kind])
    ids = tok.encode(" ".join(CORPUS * 3))
    seen: list[int] = []
    decode = tok.decode
    tok.decode = lambda window, skip=True: seen.append(len(window)) or decode(window, skip)  # type: ignore[method-assign]
    text = "".join(stream(tok.detokenizer(), ids))
    assert text == decode(ids)
    # O(1) per token, not O(n): only a short window is decoded (longer only across a run of byte-fallback pieces)
    assert len(ids) > 1000 and sum(seen) < 6 * len(ids)


def test_streaming_holds_back_text_that_clean_up_could_change(folders: dict[str, Path], tmp_path: Path) -> None:
    # transformers removes " ." / " n't" ... on decode for non-BPE models whose config asks for clean-up.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "I", "do", "n", "'", "t", "know", ".", "it", "s", "!"])}
    wordlevel = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    wordlevel.decoder = decoders.WordPiece()
    wordlevel.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": True}))
    ours, hf = load_both(tmp_path)
    for text in ["I do n't know .", "it ' s !", "I do n ' t", "I do n ' t know it ' s . I do"]:
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids)
        assert "".join(stream(ours.detokenizer(), ids)) == hf.decode(ids), text


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there 🙂"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


@pytest.mark.parametrize("kind", ["bpe", "byte"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(folders: dict[str, Path], kind: str, generation_prompt: bool) -> None:
    ours, hf = load_both(folders[kind])
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected
        # The rendered prompt is encoded without adding another BOS.
        assert ours.encode(expected, add_special_tokens=False) == hf.encode(expected, add_special_tokens=False)


FEATURE_TEMPLATE = """{%- set ns = namespace(count=0) -%}
{%- for message in messages -%}
  {%- if message.role not in ['system', 'user', 'assistant'] -%}
    {{- raise_exception('bad role ' + message.role) -}}
  {%- endif -%}
  {%- set ns.count = ns.count + 1 -%}
  {%- if message.role == 'assistant' -%}
<|assistant|>{% generation %}{{ message.content }}{% endgeneration %}{{ eos_token }}
  {%- else -%}
<|{{ message.role }}|>{{ message.content | trim }}
  {%- endif %}

{% endfor -%}
{%- if tools is not none %}tools={{ tools | tojson }}
{% endif -%}
{%- for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}
{{ ns.count }} {{ strftime_now('%Y') }} {{ bos_token }}{{ unk_token }}{{ 'think' if enable_thinking else 'plain' }}
{%- if add_generation_prompt %}
<|assistant|>
{%- endif -%}"""


def test_chat_template_features_match_transformers(folders: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(folders["bpe"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text(FEATURE_TEMPLATE, encoding="utf-8")
    ours, hf = load_both(tmp_path)
    tools = [{"type": "function", "function": {"name": "café", "parameters": {"type": "object"}}}]
    messages = [*CONVERSATIONS[1], {"role": "assistant", "content": "6", "reasoning_content": None}]
    for extra in ({}, {"tools": tools, "enable_thinking": True}):
        for prompt in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **extra)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt, **extra) == expected
    with pytest.raises(CadenzaError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_jinja_file_wins(folders: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(folders["bpe"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text("FILE{% for m in messages %} {{ m.content }}{% endfor %}")
    ours, hf = load_both(tmp_path)
    messages = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(messages) == "FILE hello"
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)


def test_chat_template_list_form_uses_default(folders: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(folders["bpe"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT {{ messages[0].content }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "DEFAULT x"


def test_missing_tokenizer_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CadenzaError) as info:
        Tokenizer.from_dir(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message
    with pytest.raises(CadenzaError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_damaged_files_are_clear_errors(folders: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(folders["bpe"], tmp_path / "a")
    (tmp_path / "a" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CadenzaError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(CadenzaError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path / "b")


def test_sentencepiece_without_protobuf_is_a_clear_error(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # tokenizer.model is edited through sentencepiece's protobuf module: without it, say so, not "damaged file".
    import sentencepiece

    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)
    monkeypatch.delattr(sentencepiece, "sentencepiece_model_pb2", raising=False)  # set once it was imported
    with pytest.raises(CadenzaError, match="protobuf") as info:
        Tokenizer.from_dir(folders["spm"])
    assert "Copy tokenizer.model again" not in str(info.value)


def test_no_chat_template_is_a_clear_error(folders: dict[str, Path], tmp_path: Path) -> None:
    write_bpe_tokenizer(tmp_path, chat_template=False)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(CadenzaError, match="no chat template.*plain text prompt") as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(tmp_path) in str(info.value)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(CadenzaError, match="chat_template.jinja"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


def test_byte_level_tokenizer_round_trips_and_documents_ids(folders: dict[str, Path]) -> None:
    ours, hf = load_both(folders["byte"])
    assert ours.vocab_size == len(hf) == 259 <= 260
    assert (ours.bos_token_id, ours.eos_token_ids) == (0, [1])
    assert ours.special_token_ids == {0, 1, 2}
    for text in [*TEXTS, "\x00\x7f\u0100 tabs\t", "🙂👍🏽🎉 家族 👨‍👩‍👧"]:
        ids = ours.encode(text)
        assert ids[0] == 0 and ids == hf.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == "<s>" + text == hf.decode(ids)
        if not any(special in text for special in ("<s>", "</s>", "<unk>")):
            assert ours.decode(ids) == text
            assert all(3 <= i < 259 for i in ids[1:])
            assert "".join(stream(ours.detokenizer(), ids)) == text
    assert ours.encode("A", add_special_tokens=False) == [3 + ord("A")]


def test_helpers_are_deterministic_and_respect_vocab_size(tmp_path: Path) -> None:
    assert write_bpe_tokenizer(tmp_path / "a", vocab_size=300) <= 300
    assert write_bpe_tokenizer(tmp_path / "b", vocab_size=300) == Tokenizer.from_dir(tmp_path / "b").vocab_size
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    for size in (280, 300):
        n = write_sentencepiece_tokenizer(tmp_path / f"s{size}", vocab_size=size)
        assert n <= size and Tokenizer.from_dir(tmp_path / f"s{size}").vocab_size == n
        write_sentencepiece_tokenizer(tmp_path / "again", vocab_size=size)
        assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (
            tmp_path / f"s{size}" / "tokenizer.model"
        ).read_bytes()
    assert not (tmp_path / "s300" / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="vocab_size"):
        write_sentencepiece_tokenizer(tmp_path / "small", vocab_size=270)
