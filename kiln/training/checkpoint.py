"""Checkpoints: HF-format model directory + safetensors optimizer state + JSON trainer state.

A run keeps ``checkpoints/step-00000123`` (the newest few, to resume from) and ``checkpoints/best``
(to export). Each is written into a temporary sibling, ends with ``manifest.json`` (every file's size
and sha256), is fsynced, and only then renamed into place: a kill or a power cut at any instant
leaves the previous checkpoint or the complete new one, and the hashes tell a damaged one apart.
Nothing here unpickles: tensors are safetensors, state is JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.files import (
    DAMAGED,
    DISK_FULL,
    exchange_dirs,
    fsync_dir,
    read_json,
    sync_files,
    temporary_sibling,
)
from kiln.model_files import (
    KILN_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    once_per_version,
    verify_manifest,
    verify_model_dir,
    verify_safetensors,
    write_manifest,
)

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
# The names kiln gives a step checkpoint, the one a save is replacing, and a temporary one: the
# only names in checkpoints/ that kiln deletes, besides `.best.tmp-*` and the like.
STEP_DIR = re.compile(r"step-(\d+)")
STEP_OLD = re.compile(r"\.step-(\d+)\.old")
STEP_TMP = re.compile(r"\.step-\d+\.tmp-.+")


# -- writing a directory atomically -------------------------------------------------------------


def _previous(target: Path) -> Path:
    return target.parent / f".{target.name}.old"








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
        fsync_dir(parent.parent)
    stale = list(parent.glob(f".{target.name}.tmp-*"))
    if STEP_DIR.fullmatch(target.name):  # each step has its own name: clean up after any step's save
        stale += _step_leftovers(parent)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return temporary_sibling(target)




def _swap_in(tmp: Path, target: Path) -> Path | None:
    """Put the complete, synced directory ``tmp`` at ``target``; returns where the replaced one
    went (None: nowhere, or ``.target.old``), for :func:`_settle` to remove."""
    if target.is_dir() and exchange_dirs(tmp, target):
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
    fsync_dir(target.parent)  # before the old one goes, so that a power cut keeps one of them
    for leftover in (replaced, _previous(target)):
        if leftover is not None and leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)






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
        sync_files(tmp)
        _settle(target, _swap_in(tmp, target))

    return tmp, commit




# -- the manifest -------------------------------------------------------------------------------




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
    for candidate, problem_error in damaged:
        problem = (problem_error.message if isinstance(problem_error, ForeignCheckpoint)
                   else f"is damaged ({_reason(candidate, problem_error)})")
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
        match = STEP_DIR.fullmatch(path.name) or STEP_OLD.fullmatch(path.name)
        assert match is not None  # doomed holds step checkpoints only
        step = match[1]
        trash = path.parent / f".step-{step}.tmp-pruned"
        shutil.rmtree(trash, ignore_errors=True)
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def save_model_dir(path: Path, model: Any, tokenizer: Any, kiln_meta: dict, weights: dict | None = None,
                   files: dict[str, str] | None = None) -> None:
    """Write an HF model directory (config, safetensors weights, tokenizer) plus ``kiln.json`` and the
    task's own ``files`` (relative path -> text; :meth:`kiln.tasks.base.Task.model_files`).

    ``weights``: the full state dict to save instead of the model's own (FSDP gathers it from the
    shards; the model's parameters are then only a rank's shard). transformers empties the dict as
    it writes, to free each tensor once it is on disk.
    """
    unwrapped = getattr(model, "module", model)
    from kiln.training import lora

    if lora.is_adapted(unwrapped):  # LoRA: what trains, beside the frozen start kiln.json names
        lora.save_adapter(path, unwrapped, weights)
        _save_tokenizer_and_files(path, tokenizer, kiln_meta, files)
        return
    sharded = type(unwrapped)
    # fully_shard swaps in a subclass named FSDP<Model>; save_pretrained writes the class name into
    # config.json's architectures, which transformers could then not load. Save as the model's class.
    unwrapped.__class__ = next(c for c in sharded.__mro__ if not c.__name__.startswith("FSDP"))
    try:
        unwrapped.save_pretrained(path, state_dict=weights, safe_serialization=True)
    finally:
        unwrapped.__class__ = sharded
    _save_tokenizer_and_files(path, tokenizer, kiln_meta, files)


def _save_tokenizer_and_files(path: Path, tokenizer: Any, kiln_meta: dict, files: dict[str, str] | None) -> None:
    tokenizer.save_pretrained(path)
    for name, text in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text, encoding="utf-8")
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
                    trainer_state: dict | None = None, rng: dict | None = None, weights: dict | None = None,
                    files: dict[str, str] | None = None) -> None:
    """Atomically write a verified checkpoint directory (model, tokenizer, optimizer, state, RNG).

    The files and then ``manifest.json`` go into a temporary sibling, are fsynced, and the directory
    is renamed into place. A failed write (a full disk: ENOSPC, EDQUOT) removes the temporary
    directory and is a KilnError; the previous checkpoint stays as it was. ``optimizer``: an
    optimizer or its full state dict; ``weights`` and ``files``: see :func:`save_model_dir`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _fresh_tmp(path)
    try:
        save_model_dir(tmp, model, tokenizer, kiln_meta, weights, files)
        state = dict(trainer_state or {})
        if optimizer is not None:
            tensors, meta = optimizer_tensors(optimizer)
            tensors.update({f"rng.{k}": v for k, v in (rng or {}).items()})
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            state["optimizer"] = meta
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        write_manifest(tmp)
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
    from kiln.training import lora

    if lora.is_adapted(unwrapped):
        lora.load_adapter(unwrapped, path)
        return
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
















@once_per_version
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






