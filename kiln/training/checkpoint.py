"""Checkpoints: HF-format model directory + safetensors optimizer state + JSON trainer state.

A run keeps ``checkpoints/step-00000123`` (the newest few, to resume from) and ``checkpoints/best``
(to export). Each is written into a temporary sibling, ends with ``manifest.json`` (every file's size
and sha256), is fsynced, and only then renamed into place: a kill or a power cut at any instant
leaves the previous checkpoint or the complete new one, and the hashes tell a damaged one apart.
Nothing here unpickles: tensors are safetensors, state is JSON.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
KILN_FILE = "kiln.json"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# What a kiln.json must hold for kiln.load (kiln.json of a checkpoint also has step and metrics).
KILN_KEYS = ("task", "task_state", "max_length", "config")
# The JSON files a transformers tokenizer directory may hold; all are read by AutoTokenizer.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "added_tokens.json")
DAMAGED = "the file is damaged (an interrupted save or copy?)"
# The names kiln gives a step checkpoint, the one a save is replacing, and a temporary one: the
# only names in checkpoints/ that kiln deletes, besides `.best.tmp-*` and the like.
STEP_DIR = re.compile(r"step-(\d+)")
STEP_OLD = re.compile(r"\.step-(\d+)\.old")
STEP_TMP = re.compile(r"\.step-\d+\.tmp-.+")
# A write that failed for want of space: the disk's, or the user's quota.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# -- writing a directory atomically -------------------------------------------------------------


def _previous(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def _fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (what was created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _renameat2() -> Any:
    """The C library's ``renameat2`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        function.restype = ctypes.c_int
    return function


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``RENAME_EXCHANGE``); False where the C
    library or the file system cannot, and the caller falls back to two renames."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2  # AT_FDCWD (<fcntl.h>), RENAME_EXCHANGE (<linux/fs.h>)
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _step_leftovers(parent: Path) -> list[Path]:
    """What killed saves and prunes of step checkpoints left in ``parent``: temporary directories,
    and a ``.step-N.old`` once ``step-N`` exists (until then it is the one to resume from)."""
    if not parent.is_dir():
        return []
    return [path for path in parent.iterdir()
            if STEP_TMP.fullmatch(path.name)
            or (STEP_OLD.fullmatch(path.name) and (parent / path.name[1:].removesuffix(".old")).is_dir())]


def _fresh_tmp(target: Path) -> Path:
    """An empty temporary sibling of ``target``, once the ones that killed saves left are removed."""
    parent = target.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(parent.parent)
    stale = list(parent.glob(f".{target.name}.tmp-*"))
    if STEP_DIR.fullmatch(target.name):  # each step has its own name: clean up after any step's save
        stale += _step_leftovers(parent)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return _temporary_sibling(target)


def _temporary_sibling(target: Path) -> Path:
    """A new empty directory next to ``target``, named after it, with a new directory's permissions."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    # mkdtemp makes it private (0700); the renamed directory (an exported model/) should have the
    # permissions any new directory gets, so that a service account can read it.
    tmp.chmod(0o777 & ~umask())
    return tmp


def _swap_in(tmp: Path, target: Path) -> Path | None:
    """Put the complete, synced directory ``tmp`` at ``target``; returns where the replaced one
    went (None: nowhere, or ``.target.old``), for :func:`_settle` to remove."""
    if target.is_dir() and _exchange(tmp, target):
        return tmp
    if target.is_dir():
        old = _previous(target)
        if old.exists():
            shutil.rmtree(old)
        # Two renames leave an instant with no `target`; `.target.old` is the one to use then.
        target.rename(old)
    tmp.rename(target)
    return None


def _settle(target: Path, replaced: Path | None) -> None:
    """After :func:`_swap_in`: make the new name durable, then remove what it replaced."""
    _fsync_dir(target.parent)  # before the old one goes, so that a power cut keeps one of them
    for leftover in (replaced, _previous(target)):
        if leftover is not None and leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)


def _settle_file(stream: Any) -> None:
    """Give an open file the permissions of any new file, then make it durable. safetensors writes
    its files private (0600), which would keep a service account from reading an exported model."""
    os.fchmod(stream.fileno(), 0o666 & ~umask())
    os.fsync(stream.fileno())


def _sync_files(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as stream:
                _settle_file(stream)
    _fsync_dir(directory)


def atomic_dir(target: Path) -> tuple[Path, Callable[[], None]]:
    """A fresh temporary sibling of ``target`` and a function that moves it into place.

    ``commit()`` fsyncs every file, then swaps the directory in with one atomic rename (Linux's
    ``RENAME_EXCHANGE``): a reader of ``target``, say a server loading an exported ``model/``, sees
    the old directory or the new one, never none or half of one. Where the file system cannot
    exchange it is two renames, and a crash between them leaves only ``.target.old``, which
    :func:`last_checkpoint` falls back to.
    """
    target = Path(target)
    tmp = _fresh_tmp(target)

    def commit() -> None:
        _sync_files(tmp)
        _settle(target, _swap_in(tmp, target))

    return tmp, commit


def new_dir(target: Path) -> tuple[Path, Callable[[], None]]:
    """:func:`atomic_dir` for a directory kiln does not own (a user's ``-o``): a temporary sibling and
    a function that syncs it and renames it to ``target``. Nothing but that temporary directory is
    ever removed (no stale siblings are cleaned up, nothing is replaced): the rename takes the place
    of a missing or empty ``target`` only, and a target that has files by then is a KilnError."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target)

    def commit() -> None:
        _sync_files(tmp)
        try:
            os.rename(tmp, target)  # replaces an empty directory, refuses one with entries
        except OSError:
            raise KilnError("exists and is not empty (now); nothing was replaced", target) from None
        _fsync_dir(target.parent)

    return tmp, commit


# -- the manifest -------------------------------------------------------------------------------


def _write_manifest(directory: Path) -> None:
    """List every file of ``directory`` with its size and sha256 in ``manifest.json``, syncing each
    as it is read (its pages are still cached), and the manifest last: a checkpoint that has one
    was written completely."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as stream:
                digest = hashlib.file_digest(stream, "sha256").hexdigest()
                _settle_file(stream)
                files[path.relative_to(directory).as_posix()] = {"size": os.fstat(stream.fileno()).st_size,
                                                                  "sha256": digest}
    with open(directory / MANIFEST_FILE, "w", encoding="utf-8") as out:
        out.write(json.dumps({"format": 1, "files": files}, indent=1) + "\n")
        out.flush()
        os.fsync(out.fileno())
    _fsync_dir(directory)


# -- finding, writing and pruning checkpoints ---------------------------------------------------


def step_checkpoint_path(checkpoints: Path, step: int) -> Path:
    """``checkpoints/step-00000123``: zero-padded, so that a listing sorts by step."""
    return Path(checkpoints) / f"step-{step:08d}"


def _step_candidates(checkpoints: Path) -> list[Path]:
    """The ``step-N`` directories and the ``.step-N.old`` fallbacks, newest step first (by number,
    which also orders steps past 10**8), each ``step-N`` before its fallback."""
    found = []
    if checkpoints.is_dir():
        for path in checkpoints.iterdir():
            match = STEP_DIR.fullmatch(path.name) or STEP_OLD.fullmatch(path.name)
            if match and path.is_dir():
                found.append((-int(match[1]), path.name.startswith("."), path))
    return [path for *_, path in sorted(found)]


def saved_checkpoints(checkpoints: Path) -> list[Path]:
    """The step checkpoints in ``checkpoints``, newest first, unverified (for reading headers; resume
    through :func:`last_checkpoint`, which verifies)."""
    return [path for path in _step_candidates(checkpoints) if STEP_DIR.fullmatch(path.name)]


def _reason(candidate: Path, err: KilnError) -> str:
    """``model.safetensors: sha256 mismatch``: what is wrong with a checkpoint, for a warning."""
    message = err.message.removesuffix(f"; {DAMAGED}")
    if err.path is None:
        return message
    file = Path(err.path)
    return f"{file.relative_to(candidate) if file.is_relative_to(candidate) else file}: {message}"


# Damaged checkpoints already reported: resuming looks for the checkpoint three times (run, trainer,
# export); the user needs to read it once.
_reported: set[str] = set()


def _complete(path: Path) -> bool:
    """Whether a checkpoint without the step layout (``best``, the ``last`` of an older kiln) looks
    complete; as before manifests, its files are verified by the caller or when loaded, and a
    damaged one is an error there, not skipped."""
    return (path / STATE_FILE).is_file() and (path / "config.json").is_file()


class ForeignCheckpoint(KilnError):
    """A checkpoint that verifies but was saved by another run (another task or configuration)."""


def same_run(meta: dict) -> Callable[[Path], None]:
    """A check for :func:`last_checkpoint`: the checkpoint's ``kiln.json`` has the task and the
    configuration (up to the settings a resume may change) of the run whose ``run.json`` is ``meta``;
    else :class:`ForeignCheckpoint`."""
    from kiln.config import changed_settings

    def check(path: Path) -> None:
        saved = read_json(path / KILN_FILE, required=("task", "config"))
        if saved["task"] != meta["task"]:
            raise ForeignCheckpoint(f"is a {saved['task']} checkpoint, not one of this {meta['task']} run",
                                    path)
        changed = changed_settings(meta["config"], saved["config"])
        if changed:
            key, ours, theirs = changed[0]
            raise ForeignCheckpoint(f"was saved by another run ({key} is {theirs!r} there, {ours!r} here)", path)

    return check


def last_checkpoint(checkpoints: Path, name: str | None = None, *, strict: bool = False,
                    belongs: Callable[[Path], None] | None = None) -> Path | None:
    """The checkpoint to resume from (or, with ``name="best"``, to export), or None.

    Without ``name``: the highest ``step-*`` directory that verifies (:func:`verify_checkpoint`);
    a damaged or incomplete one is skipped with a warning naming it and the one used instead. When
    none verifies: ``last``, the layout of an older kiln. With ``name``: ``checkpoints/name``. A save
    cut off between two renames leaves the directory it was replacing as ``.name.old``, which is
    used then. ``strict``: when there are step checkpoints but none verifies, raise the newest one's
    KilnError instead of returning None (so that ``--resume`` does not quietly start over).
    ``belongs`` (e.g. :func:`same_run`) raises a KilnError for a step checkpoint that verifies but is
    not this run's: it is skipped like a damaged one.
    """
    checkpoints = Path(checkpoints)
    damaged: list[tuple[Path, KilnError]] = []
    found = None
    for candidate in [] if name else _step_candidates(checkpoints):
        try:
            verify_checkpoint(candidate)
            if belongs is not None:
                belongs(candidate)
        except KilnError as err:
            damaged.append((candidate, err))
            continue
        found = candidate
        break
    if found is None:
        target = checkpoints / (name or "last")
        found = next((path for path in (target, _previous(target)) if _complete(path)), None)
    if found is None and damaged and strict:  # the error says it: no warning line besides
        raise damaged[0][1]
    for candidate, err in damaged:
        problem = (err.message if isinstance(err, ForeignCheckpoint)
                   else f"is damaged ({_reason(candidate, err)})")
        message = (f"{candidate} {problem}; "
                   + (f"using {found} instead" if found else "no other checkpoint verifies"))
        if message not in _reported:
            _reported.add(message)
            log.warning(message)
    return found


def prune_checkpoints(checkpoints: Path, keep_last: int, written: Collection[Path] = ()) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints that verify; damaged ones go too,
    unless none verifies (then nothing is deleted: there would be nothing left to resume from).
    ``written``: checkpoints this process wrote, trusted without hashing them again at every save.

    Only kiln's own ``step-*`` directories and their leftovers are touched: never ``best``, the
    ``last`` of an older kiln, or anything else in ``checkpoints``.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, not {keep_last}")
    checkpoints = Path(checkpoints)
    for leftover in _step_leftovers(checkpoints):
        shutil.rmtree(leftover, ignore_errors=True)
    kept, doomed = 0, []
    for candidate in _step_candidates(checkpoints):
        if kept == keep_last:
            doomed.append(candidate)
            continue
        try:
            if candidate not in written:
                verify_checkpoint(candidate)
        except KilnError as err:
            log.warning(f"removing {candidate}: it is damaged ({_reason(candidate, err)})")
            doomed.append(candidate)
        else:
            kept += 1
    if not kept:
        return
    for path in doomed:
        # Renamed first, so that a kill during the removal leaves a temporary (removed by the next
        # save), not a half-deleted checkpoint that would be reported as damaged.
        step = (STEP_DIR.fullmatch(path.name) or STEP_OLD.fullmatch(path.name))[1]
        trash = path.parent / f".step-{step}.tmp-pruned"
        shutil.rmtree(trash, ignore_errors=True)
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def save_model_dir(path: Path, model: Any, tokenizer: Any, kiln_meta: dict, weights: dict | None = None) -> None:
    """Write an HF model directory (config, safetensors weights, tokenizer) plus ``kiln.json``.

    ``weights``: the full state dict to save instead of the model's own (FSDP gathers it from the
    shards; the model's parameters are then only a rank's shard). transformers empties the dict as
    it writes, to free each tensor once it is on disk.
    """
    unwrapped = getattr(model, "module", model)
    sharded = type(unwrapped)
    # fully_shard swaps in a subclass named FSDP<Model>; save_pretrained writes the class name into
    # config.json's architectures, which transformers could then not load. Save as the model's class.
    unwrapped.__class__ = next(c for c in sharded.__mro__ if not c.__name__.startswith("FSDP"))
    try:
        unwrapped.save_pretrained(path, state_dict=weights, safe_serialization=True)
    finally:
        unwrapped.__class__ = sharded
    tokenizer.save_pretrained(path)
    (path / KILN_FILE).write_text(json.dumps(kiln_meta, indent=2) + "\n")


def optimizer_tensors(optimizer: Any) -> tuple[dict, dict]:
    """Split an optimizer's state dict (or the optimizer, whose state dict it takes) into
    safetensors-ready tensors and JSON-ready metadata."""
    import torch

    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_dict(tensors: dict, meta: dict) -> dict:
    """Inverse of :func:`optimizer_tensors`: the optimizer state dict (torch's layout)."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def restore_optimizer(optimizer: Any, tensors: dict, meta: dict) -> None:
    """Load what :func:`optimizer_tensors` split into ``optimizer``."""
    optimizer.load_state_dict(optimizer_state_dict(tensors, meta))


def _in_use(path: Path) -> Path | None:
    """The checkpoint that a failed save of ``path`` leaves to resume from (named in its error, not
    verified)."""
    if path.is_dir():
        return path
    candidates = [_previous(path)]
    if STEP_DIR.fullmatch(path.name):
        candidates += [*_step_candidates(path.parent), path.parent / "last", _previous(path.parent / "last")]
    return next((candidate for candidate in candidates if candidate.is_dir()), None)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError that made a write fail, if one did. safetensors' writer (Rust) reports one as a
    SafetensorError whose message ends in "(os error 28)"."""
    if isinstance(err, OSError):
        return err
    match = re.search(r"\(os error (\d+)\)", str(err)) if type(err).__name__ == "SafetensorError" else None
    return OSError(int(match[1]), os.strerror(int(match[1]))) if match else None


def save_checkpoint(path: Path, model: Any, tokenizer: Any, kiln_meta: dict, optimizer: Any = None,
                    trainer_state: dict | None = None, rng: dict | None = None, weights: dict | None = None) -> None:
    """Atomically write a verified checkpoint directory (model, tokenizer, optimizer, state, RNG).

    The files and then ``manifest.json`` go into a temporary sibling, are fsynced, and the directory
    is renamed into place. A failed write (a full disk: ENOSPC, EDQUOT) removes the temporary
    directory and is a KilnError; the previous checkpoint stays as it was. ``optimizer``: an
    optimizer or its full state dict; ``weights``: see :func:`save_model_dir`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _fresh_tmp(path)
    try:
        save_model_dir(tmp, model, tokenizer, kiln_meta, weights)
        state = dict(trainer_state or {})
        if optimizer is not None:
            tensors, meta = optimizer_tensors(optimizer)
            tensors.update({f"rng.{k}": v for k, v in (rng or {}).items()})
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            state["optimizer"] = meta
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        _write_manifest(tmp)
        replaced = _swap_in(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = _os_error(err)
        if cause is None:
            raise
        previous = _in_use(path)
        intact = f"the previous checkpoint {previous} is intact" if previous else "there was no previous checkpoint"
        if cause.errno in DISK_FULL:
            raise KilnError(f"disk full while writing checkpoint {path}; {intact}") from None
        raise KilnError(f"could not write the checkpoint ({cause.strerror or cause}); {intact}", path) from None
    try:
        _settle(path, replaced)
    except OSError as err:
        raise KilnError(f"written, but could not sync it to disk ({err.strerror or err})", path) from None


def load_checkpoint_state(path: Path) -> tuple[dict, dict, dict]:
    """``(trainer_state, optimizer_tensors, rng_tensors)`` of a checkpoint directory."""
    from safetensors.torch import load_file

    verify_checkpoint(path)
    state = read_json(path / STATE_FILE)
    tensors = load_file(str(path / OPTIMIZER_FILE)) if (path / OPTIMIZER_FILE).exists() else {}
    rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    return state, tensors, rng


def load_weights(model: Any, path: Path) -> None:
    """Load ``model.safetensors`` from ``path`` into ``model`` (tied weights re-tied)."""
    from safetensors.torch import load_file

    unwrapped = getattr(model, "module", model)
    verify_safetensors(path / WEIGHTS_FILE)
    weights = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = unwrapped.load_state_dict(weights, strict=False)
    tied = set(getattr(unwrapped, "_tied_weights_keys", None) or [])
    if unexpected or any(key not in tied for key in missing):
        raise KilnError(f"does not hold this model's weights (missing {len(missing)}, e.g. {missing[:2]}; "
                        f"unexpected {len(unexpected)}, e.g. {unexpected[:2]})", path)
    unwrapped.tie_weights()


# -- verifying the files kiln loads -------------------------------------------------------------
# transformers and safetensors report a damaged file with a deep traceback (or not at all: a JSON
# decoder error names no file). Every file is checked here first, so a damaged one is one line
# naming it, while a failure inside the loaders stays a traceback: that one is a kiln bug.


def read_json(path: Path, required: tuple[str, ...] = ()) -> Any:
    """Parse a JSON file kiln loads; with ``required``, it must be an object with those keys.

    A missing, empty or damaged file is a :class:`KilnError` naming it (and the line, for bad JSON).
    """
    path = Path(path)
    if not path.is_file():
        raise KilnError("file not found", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KilnError(f"not a text file; {DAMAGED}", path) from None
    if not text.strip():
        raise KilnError(f"empty file; {DAMAGED}", path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise KilnError(f"not valid JSON ({err.msg}, column {err.colno}); {DAMAGED}", path, err.lineno) from None
    if required:
        if not isinstance(value, dict):
            raise KilnError(f"expected a JSON object, found {type(value).__name__}; {DAMAGED}", path)
        missing = [key for key in required if key not in value]
        if missing:
            raise KilnError(f"missing {', '.join(repr(k) for k in missing)}; {DAMAGED}", path)
    return value


def verify_safetensors(path: Path) -> None:
    """Check a safetensors file's header and that the file is exactly as long as the header says.

    The layout is an 8-byte little-endian header length, a JSON header mapping tensor names to
    ``data_offsets`` within the data that follows, then the data. Recent ``safetensors`` checks the
    same in ``safe_open``, but only deep inside ``from_pretrained``; no version can see damage inside
    the tensor data itself (the format has no checksum).
    """
    path = Path(path)
    if not path.is_file():
        raise KilnError("file not found", path)
    size = path.stat().st_size
    if size == 0:
        raise KilnError(f"empty file (0 bytes); {DAMAGED}", path)
    with open(path, "rb") as stream:
        head = stream.read(8)
        if len(head) < 8:
            raise KilnError(f"only {size} bytes, too short for a safetensors file; {DAMAGED}", path)
        (header_length,) = struct.unpack("<Q", head)
        if header_length > 100_000_000:  # safetensors' own limit: this is not a header length
            raise KilnError(f"not a safetensors file (no valid header); {DAMAGED}", path)
        if 8 + header_length > size:
            raise KilnError(f"truncated: the header alone needs {8 + header_length} bytes, the file has "
                            f"{size}; {DAMAGED}", path)
        raw = stream.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KilnError(f"not a safetensors file (its header is not JSON); {DAMAGED}", path) from None
    if not isinstance(header, dict):
        raise KilnError(f"not a safetensors file (its header is not a JSON object); {DAMAGED}", path)
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise KilnError(f"tensor '{name}' has no valid data_offsets in the header; {DAMAGED}", path)
        data_end = max(data_end, offsets[1])
    expected = 8 + header_length + data_end
    if size < expected:
        raise KilnError(f"truncated: the header describes {expected} bytes, the file has {size}; {DAMAGED}", path)
    if size > expected:
        raise KilnError(f"{size - expected} unexpected bytes after the data the header describes; {DAMAGED}",
                        path)
    from safetensors import SafetensorError, safe_open

    try:  # the library's own checks of the header (dtypes, shapes against offsets); reads no data
        with safe_open(str(path), framework="numpy"):
            pass
    except SafetensorError as err:
        raise KilnError(f"not a valid safetensors file ({err}); {DAMAGED}", path) from None


def verify_weights(path: Path) -> None:
    """Check the weights of a model directory: ``model.safetensors``, or the sharded index and every
    shard it names. A directory with only PyTorch ``.bin`` weights is left to transformers."""
    path = Path(path)
    if (path / WEIGHTS_FILE).exists():
        verify_safetensors(path / WEIGHTS_FILE)
    elif (path / WEIGHTS_INDEX_FILE).exists():
        weight_map = read_json(path / WEIGHTS_INDEX_FILE, required=("weight_map",))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise KilnError(f"'weight_map' is not an object of file names; {DAMAGED}", path / WEIGHTS_INDEX_FILE)
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise KilnError(f"shard missing (named in {WEIGHTS_INDEX_FILE})", path / shard)
            verify_safetensors(path / shard)
    elif not any((path / name).is_file() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise KilnError(f"no model weights here (no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})", path)


def _once_per_version(check: Callable[[Path], None]) -> Callable[[Path], None]:
    """Run a directory check once per version of the directory's files (names, sizes, mtimes):
    one load passes several entry points (the predictor, the task, the tokenizer) that each check,
    and re-parsing a large tokenizer.json each time costs seconds."""
    seen: dict[Path, tuple] = {}

    @functools.wraps(check)
    def checked(path: Path) -> None:
        path = Path(path).resolve()
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
        version = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        if seen.get(path) != version:
            check(path)
            seen[path] = version

    return checked


@_once_per_version
def verify_tokenizer_files(path: Path) -> None:
    """Check the JSON files of a tokenizer directory (those that are present)."""
    path = Path(path)
    for name in TOKENIZER_JSON_FILES:
        if (path / name).exists():
            read_json(path / name, required=("model",) if name == "tokenizer.json" else ())


@_once_per_version
def verify_model_dir(path: Path) -> None:
    """Check an HF model directory before transformers loads it: ``config.json``, the weights, and
    ``generation_config.json``, ``kiln.json`` and the tokenizer files where present. A damaged file
    is a KilnError naming it."""
    path = Path(path)
    read_json(path / "config.json", required=("model_type",))
    verify_weights(path)
    if (path / "generation_config.json").exists():
        read_json(path / "generation_config.json", required=())
    if (path / KILN_FILE).exists():
        read_json(path / KILN_FILE, required=KILN_KEYS)
    verify_tokenizer_files(path)


@_once_per_version
def verify_manifest(path: Path) -> None:
    """Check every file that ``path/manifest.json`` lists against its size and sha256.

    A missing manifest (a save that never finished) and a missing, resized or changed file are each
    a KilnError naming the file.
    """
    path = Path(path)
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        raise KilnError("file not found: the checkpoint was not completely written (a run killed mid-save?)",
                        manifest)
    files = read_json(manifest, required=("files",))["files"]
    if not isinstance(files, dict) or not files:
        raise KilnError(f"'files' is not an object listing the checkpoint's files; {DAMAGED}", manifest)
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
                and not Path(name).is_absolute() and ".." not in Path(name).parts):
            raise KilnError(f"entry '{name}' is not a file name with a size and a sha256; {DAMAGED}", manifest)
        file = path / name
        if not file.is_file():
            raise KilnError(f"file not found (listed in {MANIFEST_FILE}); {DAMAGED}", file)
        size = file.stat().st_size
        if size != entry["size"]:
            raise KilnError(f"{size} bytes, {MANIFEST_FILE} says {entry['size']}; {DAMAGED}", file)
        with open(file, "rb") as stream:
            if hashlib.file_digest(stream, "sha256").hexdigest() != entry["sha256"]:
                raise KilnError(f"sha256 mismatch; {DAMAGED}", file)


@_once_per_version
def verify_checkpoint(path: Path) -> None:
    """Its manifest (:func:`verify_manifest`; required of a ``step-*`` checkpoint, checked where present
    in others, as older kiln wrote none), then :func:`verify_model_dir` plus the resume state:
    ``trainer_state.json`` and, when saved, ``optimizer.safetensors``."""
    path = Path(path)
    if (path / MANIFEST_FILE).exists() or STEP_DIR.fullmatch(path.name) or STEP_OLD.fullmatch(path.name):
        verify_manifest(path)
    verify_model_dir(path)
    state = read_json(path / STATE_FILE, required=("step",))
    if (path / OPTIMIZER_FILE).exists():
        optimizer = state.get("optimizer")
        if not (isinstance(optimizer, dict) and {"param_groups", "scalars"} <= set(optimizer)):
            raise KilnError(f"no valid 'optimizer' entry for {OPTIMIZER_FILE}; {DAMAGED}", path / STATE_FILE)
        verify_safetensors(path / OPTIMIZER_FILE)


def umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, binary: bool = False) -> Iterator[Any]:
    """A text (or ``binary``) stream whose content appears at ``path`` only when the block ends
    without an error: it is written to a temporary sibling that is then renamed, so a reader (or a
    crash) never sees half a file. The file gets the permissions of any new file, not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())  # else a power cut after the rename can leave an empty file
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as out:
        out.write(text)
