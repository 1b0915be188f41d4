"""The tokenizer a GGUF file describes in its metadata, built as transformers' GGUF loader builds it.

A GGUF has no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), merges or scores, token
types and special token ids as metadata. We rebuild a `tokenizers.Tokenizer` from those the way transformers does
(so the ids match `AutoTokenizer.from_pretrained(folder, gguf_file=...)`) and run it through the same backend as a
tokenizer.json, so decoding, streaming and special tokens behave as for a Hugging Face folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cadenza.errors import CadenzaError

if TYPE_CHECKING:
    from gguf import GGUFReader
    from tokenizers import Tokenizer as HFTokenizer

# llama.cpp's token types (tokenizer.ggml.token_type)
CONTROL, USER_DEFINED = 3, 4

# Pre-tokenizer splits by `tokenizer.ggml.pre`: the regexes of the models' own tokenizer.json, as transformers' GGUF
# loader picks them. None: GPT-2's byte-level split, which transformers applies to any value it has no regex for;
# we accept only the values for which llama.cpp splits that way too (plus "default", following transformers), and
# refuse the rest (deepseek-llm, deepseek-v3, ...) rather than tokenize differently from what the model was trained on.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS: dict[str, str | None] = {
    **dict.fromkeys(("default", "gpt-2", "olmo", "mpt", "jais", "trillion")),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        _LLAMA3,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}
# transformers builds "llama" vocabularies of these architectures differently (Gemma's spaces and merge order,
# Phi-3's prefix space); we do not, so we refuse them rather than tokenize differently.
_OTHER_SENTENCEPIECE_ARCHS = ("gemma", "gemma2", "gemma3", "phi3")
_NAMED_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """The key/value metadata of an open GGUF file as plain Python values (strings decoded, arrays as lists)."""
    # The reader's "GGUF.*" entries are header fields (version, counts), not metadata keys.
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def byte_spelling() -> dict[int, str]:
    """Byte -> the character byte-level BPE writes it as (GPT-2's table: printable bytes as themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in spelling]
    spelling.update({b: chr(256 + n) for n, b in enumerate(others)})
    return spelling


def _problem(source: str, problem: str, fix: str) -> CadenzaError:
    return CadenzaError(f"cannot build the tokenizer of {source}: {problem}. {fix}")


def _require(metadata: dict[str, Any], key: str, source: str) -> Any:
    if key not in metadata:
        raise _problem(
            source,
            f"the GGUF metadata has no {key}",
            "The file was written without its tokenizer; convert the model again with llama.cpp's "
            "convert_hf_to_gguf.py, or load the original Hugging Face folder instead.",
        )
    return metadata[key]


def _derived_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a scored vocabulary (SentencePiece files store none), ordered as transformers orders them.

    Every split of a token into two tokens of the vocabulary is a merge with the token's score; best score first,
    then longer left and right parts first. Python's sort is stable (also reversed), so remaining ties keep
    vocabulary order, with a token's own splits ordered by the ids of their parts.
    """
    ids = {token: index for index, token in enumerate(tokens)}
    token_scores = dict(zip(tokens, scores, strict=False))  # a repeated token keeps its last score, as a dict does
    merges: list[tuple[str, str, float]] = []
    for token, score in token_scores.items():
        splits = [(token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in ids and token[i:] in ids]
        merges.extend(sorted(splits, key=lambda m: (ids[m[0]], ids[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(metadata: dict[str, Any], tokens: list[str], source: str) -> HFTokenizer:
    """A "llama" vocabulary: BPE over "▁"-for-space text with <0xNN> byte fallback, as Llama's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    arch = metadata.get("general.architecture")
    if arch in _OTHER_SENTENCEPIECE_ARCHS:
        raise _problem(
            source,
            f"cadenza does not build the SentencePiece vocabulary of architecture {arch!r} from GGUF metadata "
            f"(it supports 'llama' vocabularies of other architectures; {', '.join(_OTHER_SENTENCEPIECE_ARCHS)} "
            "need their own rules)",
            "Load the model's original Hugging Face folder (with tokenizer.json) instead.",
        )
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    else:
        scores = _require(metadata, "tokenizer.ggml.scores", source)
        merges = _derived_merges(tokens, [float(s) for s in scores])
    vocab = {token: index for index, token in enumerate(tokens)}
    # No unk token in the model, as transformers builds it: byte fallback covers every character.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    # transformers ignores tokenizer.ggml.add_space_prefix: "▁" always goes before the start of the text only.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def _byte_level(metadata: dict[str, Any], tokens: list[str], source: str) -> tuple[HFTokenizer, set[str]]:
    """A "gpt2" vocabulary: byte-level BPE with the split `tokenizer.ggml.pre` names. Also returns the vocab keys."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _SPLITS:
        raise _problem(
            source,
            f"tokenizer.ggml.pre is {pre!r}, a pre-tokenizer cadenza does not know how to build "
            f"(supported: {', '.join(sorted(_SPLITS))})",
            "Load the model's original Hugging Face folder (with tokenizer.json) instead.",
        )
    merges = [tuple(m.split(" ")) for m in _require(metadata, "tokenizer.ggml.merges", source)]
    spelling = byte_spelling()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet; one that is not (an added token written as plain text) is respelled,
    # as transformers does, so its bytes still map to an id.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=""))
    split = _SPLITS[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok, set(vocab)


def _post_processor(tok: HFTokenizer, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
    """BOS/EOS around each sequence, as transformers adds them for add_bos_token/add_eos_token."""
    from tokenizers import processors

    first = f"{bos[0]}:0 " if bos else ""
    last = f" {eos[0]}:0" if eos else ""
    tok.post_processor = processors.TemplateProcessing(
        single=f"{first}$A:0{last}",
        pair=f"{first}$A:0{last} {first.replace(':0', ':1')}$B:1{last.replace(':0', ':1')}",
        special_tokens=[t for t in (bos, eos) if t],
    )


def build_gguf_tokenizer(metadata: dict[str, Any], source: str) -> tuple[HFTokenizer, dict[str, str | None]]:
    """(tokenizer, named bos/eos/unk/pad token texts) from GGUF metadata."""
    from tokenizers import AddedToken

    kind = _require(metadata, "tokenizer.ggml.model", source)
    tokens = [str(t) for t in _require(metadata, "tokenizer.ggml.tokens", source)]
    types = [int(t) for t in metadata.get("tokenizer.ggml.token_type") or ()]
    if kind == "llama":
        tok, in_vocab = _sentencepiece(metadata, tokens, source), set(tokens)
        # Sentencepiece vocabularies without the flag get a BOS, as llama.cpp (and so transformers) do.
        add_bos_default = True
    elif kind == "gpt2":
        (tok, in_vocab), add_bos_default = _byte_level(metadata, tokens, source), False
    else:
        raise _problem(
            source,
            f"tokenizer.ggml.model is {kind!r}; cadenza builds GGUF tokenizers of type 'llama' (SentencePiece) "
            "and 'gpt2' (byte-level BPE) only",
            "Load the model's original Hugging Face folder (with tokenizer.json) instead.",
        )
    # Control tokens are special (skipped by decode); in a byte-level vocabulary, one spelled outside the byte
    # alphabet is a mislabel that transformers leaves out, and so do we. User-defined tokens (e.g. <think>) are
    # matched whole in the text but are not special.
    spelled = set(byte_spelling().values()) if kind == "gpt2" else None
    typed = list(zip(tokens, types, strict=False))
    control = [t for t, k in typed if k == CONTROL and (spelled is None or set(t) <= spelled)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [t for t, k in typed if k == USER_DEFINED and t in in_vocab]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    named: dict[str, str | None] = {}
    named_ids: dict[str, int] = {}
    for name, key in _NAMED_IDS.items():
        index = metadata.get(key)
        if index is not None and not 0 <= int(index) < len(tokens):
            raise _problem(
                source,
                f"{key} is {index}, outside the vocabulary of {len(tokens)} tokens",
                "The file's metadata is damaged; convert the model again or download the file again.",
            )
        named[name] = tokens[int(index)] if index is not None else None
        if index is not None:
            named_ids[name] = int(index)
    ends = []
    for name, flag, default in (("bos_token", "add_bos_token", add_bos_default), ("eos_token", "add_eos_token", False)):
        text = named[name]
        key = f"tokenizer.ggml.{flag}"
        # The default BOS of a "llama" vocabulary needs a BOS id; only an explicit flag without one is an error.
        wanted = bool(metadata[key]) if key in metadata else default and text is not None
        if wanted and text is None:
            raise _problem(
                source,
                f"tokenizer.ggml.{flag} asks for a {name} but the file names no {name} id",
                f"Set tokenizer.ggml.{name}_id in the file (gguf's gguf_set_metadata.py), or convert it again.",
            )
        ends.append((text, named_ids[name]) if wanted and text is not None else None)
    _post_processor(tok, ends[0], ends[1])
    return tok, named
