"""What the command-line tools print on stderr besides their ``error:`` line.

The modules log through :mod:`logging` (loggers ``train.*`` and ``analysis.*``);
:func:`cli_logging` shows those messages on stderr for the duration of one
command: notes (INFO) as they are, warnings as ``warning: <message>``. Outside
a command (a library user, a test) nothing is attached and the usual logging
configuration applies.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

__all__ = ["cli_logging"]

LOGGERS = ("train", "analysis")


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


@contextlib.contextmanager
def cli_logging(level: int = logging.INFO) -> Iterator[None]:
    """Show the ``train``/``analysis`` loggers' messages at ``level`` and above on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    loggers = [logging.getLogger(name) for name in LOGGERS]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate = False  # a library's basicConfig() on the root would print it twice
    try:
        yield
    finally:
        for lg, (old, propagate) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.setLevel(old)
            lg.propagate = propagate
        handler.flush()
