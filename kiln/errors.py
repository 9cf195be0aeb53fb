"""The one error type for user mistakes: it carries ``path:line`` and becomes exit code 2."""

from __future__ import annotations

from pathlib import Path


class KilnError(Exception):
    """A problem with the user's input or invocation, reported as one line without a traceback.

    ``path`` and ``line`` (1-based) locate the problem when it is in a file.
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line

    def __str__(self) -> str:
        if self.path is None:
            return self.message
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


class ColumnsMismatch(KilnError):
    """A file whose columns do not fit the ``--columns`` mapping (a position past its last column, a
    header without the named column): an error for training data, but an optional test split laid
    out otherwise (GLUE's test files: ``index, sentence``) is skipped."""


class MissingLabels(KilnError):
    """A file read as labelled has no labels at all (no label column, key or tag column): an error
    for training data, but a file to skip when it is an optional test split."""


class RunStopped(Exception):
    """Training stopped on purpose before its end (a signal, repeated non-finite steps), with a
    resumable checkpoint written. ``exit_code`` is what the command returns: 0 when the user asked
    for the stop, 1 when the run could not go on."""

    def __init__(self, message: str, exit_code: int = 0):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
