"""kiln's messages go through the stdlib ``logging`` module, under the ``kiln`` logger.

On import, the ``kiln`` logger gets one handler of its own that prints bare messages to stderr at
INFO (WARNING on torchrun ranks other than 0, so a job prints once), and does not propagate, as
transformers' library logger does: ``kiln.train()`` in a script or notebook shows its summary and
progress as the CLI does, once. Python users set the verbosity as for any library::

    logging.getLogger("kiln").setLevel(logging.WARNING)   # only warnings and errors

and an application with its own logging set-up takes kiln's messages over with
``logger.handlers.clear(); logger.propagate = True``. The CLI sets the level from ``--quiet``
(warnings only) and ``-v`` (debug detail too).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGER_NAME = "kiln"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and notebooks replace it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # StreamHandler.__init__ sets it; the property always answers the current stderr


def default_level() -> int:
    """INFO, or WARNING on a torchrun rank other than 0."""
    import os

    return logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING


def install_default_handler() -> None:
    """Give the ``kiln`` logger its stderr handler and default level, once (a level the application
    already set is kept)."""
    logger = logging.getLogger(LOGGER_NAME)
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(default_level())
    logger.propagate = False  # one copy of each line, even where the root logger prints too


def set_verbosity(quiet: bool = False, verbose: int = 0) -> None:
    """The CLI's ``--quiet`` (warnings and errors only) and ``-v`` (debug detail)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else default_level()
    logging.getLogger(LOGGER_NAME).setLevel(level)
