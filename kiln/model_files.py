"""What a kiln model directory holds, and the checks that run before anything loads one: its file
names, ``manifest.json`` (every file's size and sha256), safetensors headers, the tokenizer's JSON,
and where a run keeps its model. A damaged file is a KilnError naming it, not a deep traceback.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

from kiln.errors import KilnError
from kiln.files import DAMAGED, fsync_dir, read_json, settle_file

RUN_FILE = "run.json"  # marks a directory as a kiln run: --overwrite deletes nothing without it
METRICS_FILE = "metrics.jsonl"  # a run's records: training windows, evaluations, the test split
KILN_FILE = "kiln.json"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# A LoRA run's checkpoints hold peft's adapter files instead of the full weights (kiln.training.lora).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# What a kiln.json must hold for kiln.load (kiln.json of a checkpoint also has step and metrics).
KILN_KEYS = ("task", "task_state", "max_length", "config")
# The JSON files a transformers tokenizer directory may hold; all are read by AutoTokenizer.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "added_tokens.json")


def write_manifest(directory: Path) -> None:
    """List every file of ``directory`` with its size and sha256 in ``manifest.json``, syncing each
    as it is read (its pages are still cached), and the manifest last: a checkpoint that has one
    was written completely."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as stream:
                digest = hashlib.file_digest(stream, "sha256").hexdigest()
                settle_file(stream)
                files[path.relative_to(directory).as_posix()] = {"size": os.fstat(stream.fileno()).st_size,
                                                                  "sha256": digest}
    with open(directory / MANIFEST_FILE, "w", encoding="utf-8") as out:
        out.write(json.dumps({"format": 1, "files": files}, indent=1) + "\n")
        out.flush()
        os.fsync(out.fileno())
    fsync_dir(directory)


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


def once_per_version(check: Callable[[Path], None]) -> Callable[[Path], None]:
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


@once_per_version
def verify_tokenizer_files(path: Path) -> None:
    """Check the JSON files of a tokenizer directory (those that are present)."""
    path = Path(path)
    for name in TOKENIZER_JSON_FILES:
        if (path / name).exists():
            read_json(path / name, required=("model",) if name == "tokenizer.json" else ())


def verify_adapter(path: Path) -> None:
    """Check a LoRA checkpoint's peft adapter files (a damaged one is a KilnError naming it)."""
    config = read_json(path / ADAPTER_CONFIG, required=("r", "target_modules"))
    if config.get("peft_type") != "LORA":
        raise KilnError(f"not a LoRA adapter (peft_type {config.get('peft_type')!r}); {DAMAGED}", path / ADAPTER_CONFIG)
    verify_safetensors(path / ADAPTER_WEIGHTS)


@once_per_version
def verify_model_dir(path: Path) -> None:
    """Check an HF model directory before transformers loads it: ``config.json``, the weights, and
    ``generation_config.json``, ``kiln.json`` and the tokenizer files where present. A damaged file
    is a KilnError naming it."""
    path = Path(path)
    read_json(path / "config.json", required=("model_type",))
    if (path / ADAPTER_CONFIG).is_file():  # a LoRA checkpoint: its frozen start is checked when it loads
        verify_adapter(path)
    else:
        verify_weights(path)
    if (path / "generation_config.json").exists():
        read_json(path / "generation_config.json", required=())
    if (path / KILN_FILE).exists():
        read_json(path / KILN_FILE, required=KILN_KEYS)
    verify_tokenizer_files(path)


@once_per_version
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


def model_dir_of(path: str | Path) -> Path:
    """The model directory inside a run directory, or ``path`` itself when it is one."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    raise KilnError("not a run or model directory (no config.json or model/config.json)", path)
