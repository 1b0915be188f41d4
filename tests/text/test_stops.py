"""Stop strings in streamed text: never a part of one emitted, the same result however the text is cut."""

from __future__ import annotations

import random

import pytest

from cadenza import CadenzaError, SamplingParams
from cadenza.text import StopStrings


def run_pieces(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    """Feeds pieces until a stop; returns everything emitted (plus the flush when no stop) and whether it stopped."""
    matcher = StopStrings(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_inside_one_piece():
    matcher = StopStrings(["STOP"])
    assert matcher.feed("hello STOP world") == ("hello ", True)
    assert matcher.finished and matcher.matched == "STOP"
    assert matcher.feed("more") == ("", True) and matcher.flush() == ""


def test_stop_spanning_pieces():
    matcher = StopStrings(["<|end|>"])
    assert matcher.feed("answer <") == ("answer ", False)
    assert matcher.feed("|en") == ("", False)
    assert matcher.feed("d|> tail") == ("", True)
    assert run_pieces(["<|end|>"], list("abc<|end|>xyz")) == ("abc", True)


def test_stop_at_start():
    assert StopStrings(["\n\n"]).feed("\n\nrest") == ("", True)
    assert run_pieces(["\n\n"], ["\n", "\n", "x"]) == ("", True)


def test_earliest_stop_wins():
    assert run_pieces(["abc", "ab"], ["xabcd"]) == ("x", True)
    assert run_pieces(["ab", "abc"], ["x", "a", "b", "c"]) == ("x", True)
    assert run_pieces(["later", "first"], ["a first then later"]) == ("a ", True)
    # "bc" is complete before "abcd" could be: the stream stops there, however the text is cut
    assert run_pieces(["abcd", "bc"], ["abcd"]) == ("a", True)
    assert run_pieces(["abcd", "bc"], list("abcd")) == ("a", True)
    # same end: the stop that starts first
    assert run_pieces(["ab", "xab"], ["xab"]) == ("", True)


def test_holds_back_only_what_could_be_a_stop():
    matcher = StopStrings(["aab", "zzz"])
    assert matcher.feed("xa") == ("x", False)  # "a" may start "aab"
    assert matcher.feed("a") == ("", False)  # "aa" may too
    assert matcher.feed("a") == ("a", False)  # "aaa": only the last "aa" can still grow into "aab"
    assert matcher.feed("c") == ("aac", False)  # nothing can grow into a stop any more
    assert matcher.feed("zz") == ("", False)
    assert matcher.flush() == "zz" and matcher.flush() == ""
    assert StopStrings(["END"]).feed("no stop here") == ("no stop here", False)


def test_no_stops_passes_text_through():
    matcher = StopStrings([])
    assert matcher.feed("anything") == ("anything", False) and matcher.flush() == ""


def test_no_leak_and_no_loss_without_a_stop():
    """Emitted pieces plus the flush give back the original text, for any cutting, when no stop occurs."""
    rng = random.Random(0)
    stops = ["</s>", "User:", "ééé", "\n\n\n"]
    text = "A reply with </ and User and é é ée and \n\n but never a whole stop: Use </<s> U\n\n"
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 15)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        matcher = StopStrings(stops)
        out = []
        for piece in pieces:
            emitted, stopped = matcher.feed(piece)
            assert not stopped
            out.append(emitted)
            assert not any(s in "".join(out) for s in stops)
        assert "".join(out) + matcher.flush() == text


def test_result_does_not_depend_on_cutting():
    rng = random.Random(1)
    stops = ["ab", "bca", "cab", "→←", "ß"]
    for _ in range(300):
        text = "".join(rng.choice("abcx→←ß") for _ in range(rng.randint(0, 30)))
        whole = run_pieces(stops, [text])
        chars = run_pieces(stops, list(text))
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 4))) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert whole == chars == run_pieces(stops, pieces), text
        # the reference: cut the text before the stop string that ends first
        hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
        want = (text[: min(hits)[1]], True) if hits else (text, False)
        assert whole == want


def test_unicode_stop_strings():
    assert run_pieces(["。", "🛑"], ["你好", "世界。", "再见"]) == ("你好世界", True)
    assert run_pieces(["🛑 end"], ["emoji 🛑", " en", "d!"]) == ("emoji ", True)
    matcher = StopStrings(["ñandú"])
    assert matcher.feed("año ña") == ("año ", False)
    assert matcher.feed("ndo") == ("ñando", False)


def test_bad_stop_strings_refused():
    with pytest.raises(CadenzaError, match="stop"):
        StopStrings(["ok", ""])


def test_params_feed_the_matcher():
    p = SamplingParams(stop="\nUser:")
    assert run_pieces(p.stop, ["Sure.\nUs", "er: hi"]) == ("Sure.", True)
