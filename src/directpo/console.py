"""Console output: the `directpo` logger of Python's `logging`, one voice for every command.

`log(msg)` (INFO) prints `[directpo] msg` on stderr, `warn(msg)` (WARNING) `[directpo] warning: msg`;
under torchrun only rank 0 prints. The logger is set up once, at its first line: a handler on stderr
in that format (`HANDLER`), level INFO, `propagate` off so a root logger configured by the
application does not print every line twice. Unless the application set it up first: a level or a
handler given to the `directpo` logger before its first line is kept (and then no handler is added).

A library user reconfigures it as any logger:

    logging.getLogger("directpo").setLevel(logging.WARNING)   # progress lines off, warnings kept
    logging.getLogger("directpo").removeHandler(directpo.console.HANDLER)
    logging.getLogger("directpo").propagate = True             # through the application's handlers
"""
from __future__ import annotations

import logging
import os
import sys

LOGGER = logging.getLogger("directpo")


class _Format(logging.Formatter):
    """`[prefix] msg`, `[prefix] warning: msg` at WARNING (`error: ` at ERROR, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        text = f"[{getattr(record, 'prefix', 'directpo')}] {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Stderr(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a line is written (a test's capture, a redirect)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(_Format())
        self.addFilter(lambda record: os.environ.get("RANK", "0") == "0")  # one voice under torchrun

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


HANDLER = _Stderr()
_configured = False


def _logger() -> logging.Logger:
    global _configured
    if not _configured:
        _configured = True
        if LOGGER.level == logging.NOTSET:
            LOGGER.setLevel(logging.INFO)
        if not LOGGER.handlers:
            LOGGER.addHandler(HANDLER)
            LOGGER.propagate = False
    return LOGGER


_WARNING = "warning: "


def log(msg: str, prefix: str = "directpo") -> None:
    """`[directpo] msg` on stderr (INFO), from rank 0 only under torchrun. A message written as
    `"warning: ..."` is logged at WARNING (the same line): `warn` says it directly."""
    if isinstance(msg, str) and msg.startswith(_WARNING):
        warn(msg[len(_WARNING):], prefix)
    else:
        _logger().info(msg, extra={"prefix": prefix})


def warn(msg: str, prefix: str = "directpo") -> None:
    """`[directpo] warning: msg` on stderr (WARNING), from rank 0 only under torchrun."""
    _logger().warning(msg, extra={"prefix": prefix})
