"""Checkpoints: HF-format model directory + safetensors optimizer state + JSON trainer state.

Every checkpoint is written into a temporary directory and renamed into place, so a reader never
sees a half-written one. Nothing here unpickles: tensors are safetensors, state is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
KILN_FILE = "kiln.json"


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
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)

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

    state = json.loads((path / STATE_FILE).read_text())
    tensors = load_file(str(path / OPTIMIZER_FILE)) if (path / OPTIMIZER_FILE).exists() else {}
    rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    return state, tensors, rng


def load_weights(model: Any, path: Path) -> None:
    """Load ``model.safetensors`` from ``path`` into ``model`` (tied weights re-tied)."""
    from safetensors.torch import load_file

    unwrapped = getattr(model, "module", model)
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = unwrapped.load_state_dict(weights, strict=False)
    tied = set(getattr(unwrapped, "_tied_weights_keys", None) or [])
    if unexpected or any(key not in tied for key in missing):
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    unwrapped.tie_weights()
