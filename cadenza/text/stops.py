"""Stop strings in streamed text: the text before the first stop string, never a part of one."""

from __future__ import annotations

from collections.abc import Sequence

from cadenza.errors import CadenzaError


class StopStrings:
    """Finds stop strings in streamed text without ever emitting part of one.

    `feed(piece)` returns the text that is now safe to show and whether a stop string was found. Text that might
    be the start of a stop string is held back, and only that: the longest tail of the text so far that is a
    proper prefix of some stop string. When a stop string is found, the returned text is everything before it,
    the rest is dropped, and the matcher is finished. `flush()` returns the held-back text when generation ends
    for another reason.

    When several stop strings occur, the one that is complete first in the stream wins (the smallest end
    position), and among those ending at the same place the one that starts first. That is the stop a token-by-
    token check would hit first, so the result does not depend on how the text was cut into pieces.
    """

    def __init__(self, stops: Sequence[str]):
        stops = [stops] if isinstance(stops, str) else list(stops)
        if not all(isinstance(s, str) and s for s in stops):
            raise CadenzaError(f"Invalid stop strings: {stops!r}. Use non-empty strings.")
        self.stops = stops
        self._longest = max((len(s) for s in stops), default=0)
        self._held = ""
        self.finished = False
        self.matched: str | None = None  # the stop string that was found

    def feed(self, text: str) -> tuple[str, bool]:
        """One more piece of text -> (text safe to emit now, whether a stop string was found)."""
        if self.finished:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        # Only occurrences ending inside the new text are new: anything earlier was checked by an earlier call.
        # find() from the start is still correct (and cheap): the held tail is shorter than the longest stop.
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stops:
            start = buf.find(stop)
            if start >= 0:
                found = (start + len(stop), start, stop)
                if best is None or found[:2] < best[:2]:
                    best = found
        if best is not None:
            _, start, stop = best
            self._held = ""
            self.finished = True
            self.matched = stop
            return buf[:start], True
        cut = self._hold_from(buf)
        self._held = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        """The held-back text, once no more text is coming (nothing after a stop string was found)."""
        held, self._held = self._held, ""
        return held

    def _hold_from(self, buf: str) -> int:
        """Index where the longest tail of `buf` that could still grow into a stop string begins (len: none)."""
        for i in range(max(0, len(buf) - self._longest + 1), len(buf)):
            tail = buf[i:]
            if any(stop.startswith(tail) for stop in self.stops):
                return i
        return len(buf)
