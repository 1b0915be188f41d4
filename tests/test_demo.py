"""The built-in demo model: trained at first use on cadenza.demo_text, it continues the default prompt with words."""

from __future__ import annotations

import re
import string

import torch

from cadenza.demo_text import DEMO_TEXT


def test_demo_continues_the_default_prompt_with_words_from_its_text():
    from cadenza import LLM, SamplingParams

    llm = LLM(None, device="cpu")
    text = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)).text
    readable = sum(c in string.ascii_letters + string.digits + string.punctuation + " \n" for c in text)
    assert readable >= 0.9 * len(text), repr(text)
    known = set(re.findall(r"[a-z]{3,}", DEMO_TEXT.lower()))
    words = [w for w in re.findall(r"[A-Za-z]{3,}", text) if w.lower() in known]
    assert len(words) >= 2, repr(text)


def test_demo_training_is_deterministic(tmp_path):
    """The same seed gives the same weights, bit for bit (a few steps: a full build takes over 20 s on a loaded
    2-core box, too slow to run twice in the suite, so the whole build's bytes are not compared here)."""
    from cadenza.demo import demo_config, train_weights
    from cadenza.text import Tokenizer, write_byte_level_tokenizer

    write_byte_level_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    config = demo_config(tok.vocab_size, tok.bos_token_id, tok.eos_token_ids)
    a, b = (train_weights(config, tok, DEMO_TEXT, steps=4) for _ in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = train_weights(config, tok, DEMO_TEXT, seed=1, steps=4)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
