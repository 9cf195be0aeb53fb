"""Checkpoints: HF-format model directory + safetensors optimizer state + JSON trainer state.

Every checkpoint is written into a temporary directory and renamed into place, so a reader never
sees a half-written one. Nothing here unpickles: tensors are safetensors, state is JSON.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from kiln.errors import KilnError

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
KILN_FILE = "kiln.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# What a kiln.json must hold for kiln.load (kiln.json of a checkpoint also has step and metrics).
KILN_KEYS = ("task", "task_state", "max_length", "config")
# The JSON files a transformers tokenizer directory may hold; all are read by AutoTokenizer.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "added_tokens.json")
DAMAGED = "the file is damaged (an interrupted save or copy?)"


def _previous(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def atomic_dir(target: Path) -> tuple[Path, Any]:
    """A fresh temporary sibling of ``target`` and a function that moves it into place.

    The swap is two renames: ``target`` → ``.target.old``, then the new one → ``target``. A crash
    between them leaves only ``.target.old``, which :func:`last_checkpoint` falls back to.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    # mkdtemp makes it private (0700); the renamed directory (an exported model/) should have the
    # permissions any new directory gets, so that a service account can read it.
    tmp.chmod(0o777 & ~umask())

    def commit() -> None:
        old = _previous(target)
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            target.rename(old)
        tmp.rename(target)
        if old.exists():
            shutil.rmtree(old)

    return tmp, commit


def last_checkpoint(checkpoints: Path, name: str = "last") -> Path | None:
    """The complete checkpoint ``checkpoints/name``, or the one it was replacing when a save was cut
    off between its two renames; None when there is neither."""
    for path in (checkpoints / name, _previous(checkpoints / name)):
        if (path / STATE_FILE).is_file() and (path / "config.json").is_file():
            return path
    return None


def save_model_dir(path: Path, model: Any, tokenizer: Any, kiln_meta: dict) -> None:
    """Write an HF model directory (config, safetensors weights, tokenizer) plus ``kiln.json``."""
    unwrapped = getattr(model, "module", model)
    unwrapped.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / KILN_FILE).write_text(json.dumps(kiln_meta, indent=2) + "\n")


def optimizer_tensors(optimizer: Any) -> tuple[dict, dict]:
    """Split an optimizer state_dict into safetensors-ready tensors and JSON-ready metadata."""
    import torch

    state = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: Any, tensors: dict, meta: dict) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, model: Any, tokenizer: Any, kiln_meta: dict, optimizer: Any = None,
                    trainer_state: dict | None = None, rng: dict | None = None) -> None:
    """Atomically write a checkpoint directory (model, tokenizer, optimizer, state, RNG)."""
    from safetensors.torch import save_file

    tmp, commit = atomic_dir(path)
    save_model_dir(tmp, model, tokenizer, kiln_meta)
    state = dict(trainer_state or {})
    if optimizer is not None:
        tensors, meta = optimizer_tensors(optimizer)
        tensors.update({f"rng.{k}": v for k, v in (rng or {}).items()})
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        state["optimizer"] = meta
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    commit()


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
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
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
def verify_checkpoint(path: Path) -> None:
    """:func:`verify_model_dir` plus the resume state: ``trainer_state.json`` and, when saved,
    ``optimizer.safetensors``."""
    path = Path(path)
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
def atomic_file(path: Path) -> Iterator[TextIO]:
    """A text stream whose content appears at ``path`` only when the block ends without an error:
    it is written to a temporary sibling that is then renamed, so a reader (or a crash) never sees
    half a file. The file gets the permissions of any new file, not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            yield out
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as out:
        out.write(text)
