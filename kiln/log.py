"""kiln's messages go through the stdlib ``logging`` module, under the ``kiln`` logger.

On import, the ``kiln`` logger gets one handler of its own that prints bare messages to stderr at
INFO, so ``kiln.train()`` in a script or notebook shows its summary and progress as the CLI does.
Python users set the verbosity as for any library::

    logging.getLogger("kiln").setLevel(logging.WARNING)   # only warnings and errors

The CLI sets it from ``--quiet`` (warnings only) and ``-v`` (debug detail too).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGER_NAME = "kiln"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and notebooks replace it)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # StreamHandler.__init__ sets it; the property always answers the current stderr


def install_default_handler() -> None:
    """Give the ``kiln`` logger its stderr handler and INFO level, once (not when the application
    already configured it)."""
    logger = logging.getLogger(LOGGER_NAME)
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False  # one copy of each line, even where the root logger prints too


def set_verbosity(quiet: bool = False, verbose: int = 0) -> None:
    """The CLI's ``--quiet`` (warnings and errors only) and ``-v`` (debug detail)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.getLogger(LOGGER_NAME).setLevel(level)
