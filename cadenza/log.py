"""How cadenza's log records reach the terminal, as `cadenza: <message>` lines on stderr.

The library logs through `logging`, loggers named `cadenza.<module>`: WARNING for what a user must see (a kernel
that is off, an unusable cache), INFO for progress. Two handlers show them:

- the default one, installed with the package: WARNING and up, like `logging.lastResort` but with the prefix users
  know, and also while handlers that do not print (pytest's capture) sit on the root logger; it stays quiet when the
  application's own logging already prints to the terminal, so nothing shows twice;
- `to_terminal()`, which the CLI calls: INFO and up (progress: on a terminal a tqdm bar instead, see
  cadenza.moe.quantize.Progress).
"""

from __future__ import annotations

import logging
import sys

ROOT = "cadenza"


class TerminalHandler(logging.Handler):
    """Writes `cadenza: <message>` lines to the current sys.stderr (looked up per record, so redirections and
    pytest's capture apply)."""

    def __init__(self, level: int, default: bool = False):
        super().__init__(level)
        self.default = default
        self.setFormatter(logging.Formatter("cadenza: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self.default and _application_prints_logs(self):
            return
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def terminal_bar(file, total: int, desc: str, unit: str, **kw):
    """A tqdm bar on the terminal `file`. A terminal that reports no size (some pseudo-terminals) gets 100 x 24:
    tqdm would hide the bar there."""
    import os

    from tqdm import tqdm

    try:
        size = os.get_terminal_size(file.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    sized = size.columns > 0 and size.lines > 0
    return tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=sized, ncols=None if sized else 100,
                nrows=None if sized else 24, **kw)  # fmt: skip


def _terminal_streams() -> tuple:
    return (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


def _application_prints_logs(ours: logging.Handler) -> bool:
    """Whether a handler the application set (on the root or the cadenza logger) prints to stderr or stdout."""
    handlers = logging.getLogger().handlers + logging.getLogger(ROOT).handlers
    streams = _terminal_streams()
    return any(
        h is not ours and isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in streams
        for h in handlers
    )


def _ours() -> list[TerminalHandler]:
    return [h for h in logging.getLogger(ROOT).handlers if isinstance(h, TerminalHandler)]


def install_default() -> None:
    """The default handler (WARNING and up) on the `cadenza` logger, once."""
    if not _ours():
        logging.getLogger(ROOT).addHandler(TerminalHandler(logging.WARNING, default=True))


def to_terminal(level: int = logging.INFO) -> None:
    """The CLI's choice: records from `level` up (progress included) on stderr, in place of the default handler."""
    logger = logging.getLogger(ROOT)
    for h in _ours():
        logger.removeHandler(h)
    logger.addHandler(TerminalHandler(level))
    logger.setLevel(level)


install_default()
