"""Where a command may write a file the user names (``-o``, ``--png``): never over a file the
command reads, and never inside a run or model directory, which only ``kiln train`` writes.

Every check happens before the work that fills the file starts, so a refused target costs nothing
and nothing is half-written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from kiln.errors import KilnError


def check_output(path: str | Path, inputs: Iterable[str | Path | None] = (), *, directory: bool = False,
                 new_directories: bool = True) -> Path:
    """Refuse ``path`` as a place to write when it cannot be written, is one of ``inputs`` (same
    resolved path or same inode, so symlinks, hard links and ``./`` spellings are caught), is an
    existing file inside an input directory, or lies inside a run or model directory.

    ``directory`` says the target is a directory to fill (``--png DIR``) rather than one file;
    ``new_directories=False`` requires the parent to exist already. Returns ``path``.
    """
    target = Path(path)
    if target.exists() and target.is_dir() != directory:
        raise KilnError("is a directory; give the path of the file to write" if not directory
                        else "exists and is not a directory", target)
    if not new_directories and not target.absolute().parent.is_dir():
        raise KilnError("the directory for this file does not exist", target)
    ancestor = target.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise KilnError(f"cannot write here: {ancestor} is a file, not a directory", target)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise KilnError(f"cannot write here: no permission to write in {ancestor}", target)

    resolved = target.resolve()
    for source in inputs:
        if source is None or str(source) == "<stdin>":
            continue
        source = Path(source)
        if _same_file(resolved, source):
            raise KilnError(f"is this command's input ({source}); writing it would destroy it: choose "
                            "another output name", target)
        if source.is_dir() and target.exists() and resolved.is_relative_to(source.resolve()):
            raise KilnError(f"is a file inside this command's input {source}; writing it would destroy it: "
                            "choose another output name", target)
    owner = kiln_directory(resolved if directory else resolved.parent)
    if owner is not None:
        kind = "model" if (owner / "config.json").is_file() else "run"
        raise KilnError(f"lies inside the {kind} directory {owner}, which only kiln train writes; writing "
                        "there could break it: choose a path outside it", target)
    return target


def kiln_directory(path: Path) -> Path | None:
    """The nearest of ``path`` and its ancestors that is a run directory or a model directory
    (kiln's export or checkpoint, or any HF model directory: ``config.json`` beside weights), if any.
    A lone ``config.json`` is not enough: plenty of project folders have one."""
    from kiln.model_files import RUN_FILE

    for folder in (path, *path.parents):
        if (folder / RUN_FILE).is_file() or (folder / "kiln.json").is_file():
            return folder
        if (folder / "config.json").is_file() and any(
                (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json",
                                                       "pytorch_model.bin")):
            return folder
    return None


def _same_file(resolved: Path, source: Path) -> bool:
    if resolved == source.resolve():
        return True
    try:
        return resolved.exists() and source.exists() and os.path.samefile(resolved, source)
    except OSError:
        return False
