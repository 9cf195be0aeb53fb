"""``kiln.train``: from a data path and a profile to a run directory with an exported model.

A run directory ``runs/NAME/`` holds ``config.yaml`` (the resolved configuration), ``metrics.jsonl``,
``checkpoints/{best,last}/`` and ``model/``, the best model in HF format plus ``kiln.json``.
All input is read and validated before the directory is created, so bad input never leaves a
half-written run behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln import __version__
from kiln.config import Config, ConfigBuilder, config_from_dict, resolve_key
from kiln.errors import KilnError
from kiln.tasks import get_task
from kiln.tasks.base import Dataset
from kiln.training import checkpoint as ckpt

MODEL_FILES_SKIP = {ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE}


@dataclass
class Run:
    """A finished (or resumed) training run."""

    path: Path
    metrics: dict
    config: Config

    @property
    def model_dir(self) -> Path:
        """The exported HF model directory."""
        return self.path / "model"

    def load(self, **kwargs: Any) -> Any:
        """A :class:`~kiln.predictor.Predictor` for the exported model."""
        from kiln.predictor import Predictor

        return Predictor(self.model_dir, **kwargs)


def is_main_process() -> bool:
    """True on rank 0 (or without torchrun): the one process that writes the run directory."""
    return int(os.environ.get("RANK", 0)) == 0


def model_dir_of(path: str | Path) -> Path:
    """The model directory inside a run directory, or ``path`` itself when it is one."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    raise KilnError("not a run or model directory (no config.json or model/config.json)", path)


def resolve_config(task: str, profile: str | None, init: str | None, flags: dict[str, Any],
                   overrides: list[str] | tuple[str, ...] = ()) -> ConfigBuilder:
    """Merge profile (default ``bert-mini``; with --init, the shared encoder recipe) and overrides."""
    from kiln.profiles import builder_for
    from kiln.tasks import task_class

    default = task_class(task).default_profile
    profile = profile or (("_generation" if task == "generation" else "_encoder") if init else default)
    dotted = {resolve_key(k): v for k, v in flags.items() if v is not None}
    return builder_for(profile, dotted, overrides)


def _read_splits(task: Any, data: str | Path, config: Config) -> tuple[Dataset, Dataset]:
    splits = task.find_splits(data)
    train = task.read(splits["train"])
    if "validation" in splits:
        validation = task.read(splits["validation"])
    else:
        train, validation = task.holdout(train)
    return train, validation


def train(
    task: str,
    data: str | Path,
    *,
    name: str,
    profile: str | None = None,
    init: str | Path | None = None,
    tokenizer: str | Path | None = None,
    output_dir: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
    callbacks: list | tuple = (),
    **flags: Any,
) -> Run:
    """Train a model for ``task`` on ``data`` and export it to ``output_dir/name/model``.

    ``flags`` are settings by leaf or dotted name (``epochs=1``, ``lr=1e-3``,
    ``**{"model.config.num_hidden_layers": 2}``); ``overrides`` are ``key=value`` strings as ``-c``.
    """
    import torch

    from kiln.models import architecture_errors, hf_config, max_positions
    from kiln.tokenizers import load_tokenizer, train_tokenizer
    from kiln.training.device import resolve_device, resolve_precision
    from kiln.training.trainer import Trainer

    run_dir = Path(output_dir) / name
    saved_meta: dict = {}
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise KilnError("nothing to resume: no config.yaml in the run directory", run_dir)
        saved_meta = json.loads((run_dir / "run.json").read_text())
        config = config_from_dict(saved_meta["config"])
        task, data, init = saved_meta["task"], saved_meta["data"], saved_meta.get("init")
    else:
        config = resolve_config(task, profile, str(init) if init else None, flags, overrides).build()
        if is_main_process() and run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            raise KilnError("run directory already exists; use --resume to continue it or "
                            "--overwrite to start over", run_dir)
    task_obj = get_task(task, config, saved_meta.get("task_state"))
    if task not in config.tasks:
        raise KilnError(f"profile '{config.name}' does not support task '{task}' "
                        f"(it supports {', '.join(config.tasks)})")
    train_ds, validation_ds = _read_splits(task_obj, data, config)
    try:
        if not resume:
            task_obj.fit(train_ds)
        task_obj.check(validation_ds)
    except KilnError as err:
        if validation_ds.path == train_ds.path and not resume:  # split from one file: say so
            err.message += (f" (validation is {len(validation_ds)} of the file's "
                            f"{len(train_ds) + len(validation_ds)} examples, held out at random; "
                            "more data or a validation file helps)")
        raise
    if not (config.train.epochs or config.train.max_steps or config.train.budget):
        raise KilnError("setting 'train.epochs' is 0, and neither max_steps nor a budget is set: nothing to train")
    if config.train.metric and config.train.metric not in task_obj.metric_names():
        raise KilnError(f"setting 'train.metric': '{config.train.metric}' is not one of this task's metrics "
                        f"({', '.join(task_obj.metric_names())})")

    # Device and precision errors are user errors too: raise them before anything is written.
    resolve_precision(config.train.precision, resolve_device(config.train.device))

    torch.manual_seed(config.train.seed)
    init_dir = None
    last = ckpt.last_checkpoint(run_dir / "checkpoints") if resume else None
    if last is not None:
        tok = load_tokenizer(last)
        model = task_obj.load_model(last)
    elif init:
        init_dir = model_dir_of(init)
        tok = load_tokenizer(tokenizer or init_dir)
        model = task_obj.load_model(init_dir, ignore_mismatched_sizes=True, **task_obj.model_kwargs())
    else:
        if tokenizer:
            tok = load_tokenizer(tokenizer)
        else:
            with architecture_errors(config.name):
                arch_positions = max_positions(hf_config(config.model.type, config.model.config))
            tok, _ = train_tokenizer(config.tokenizer, list(task_obj.texts(train_ds)), arch_positions)
        special = {k: getattr(tok, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")
                   if getattr(tok, k, None) is not None}
        special.update({k: getattr(tok, k) for k in ("cls_token_id", "sep_token_id")  # ModernBERT has them
                        if k in config.model.config and getattr(tok, k, None) is not None})
        arch = {**config.model.config, "vocab_size": len(tok), **special}
        with architecture_errors(config.name):
            model = task_obj.build_model(hf_config(config.model.type, arch, **task_obj.model_kwargs()))
    max_length = min(config.train.max_length, max_positions(model.config))
    task_obj.tokenizer = tok
    cap = task_obj.eval_cap()
    if cap and len(validation_ds) > cap:  # e.g. generation: decode a fixed sample at each evaluation
        validation_ds = Dataset(validation_ds.path, validation_ds.examples[:cap], extras=validation_ds.extras)

    train_features = task_obj.encode(train_ds, tok, max_length)
    validation_features = task_obj.encode(validation_ds, tok, max_length)

    meta = {
        "kiln_version": __version__,
        "task": task,
        "task_state": task_obj.state,
        "profile": config.name,
        "data": str(data),
        "init": str(init_dir or init) if (init_dir or init) else None,
        "max_length": max_length,
        "config": config.to_dict(),
    }
    description = {"task": task, "name": name, "profile": config.name,
                   "init": f"from {meta['init']}" if meta["init"] else "from scratch"}
    trainer = Trainer(model, task_obj, config, tok, train_features, validation_features, validation_ds,
                      run_dir=run_dir, callbacks=list(callbacks), kiln_meta=meta, description=description)
    if not resume and is_main_process():  # only now: every check above has passed
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        import yaml

        (run_dir / "config.yaml").write_text(yaml.safe_dump(
            {"task": task, "data": str(data), "init": meta["init"], **config.to_dict()}, sort_keys=False))
        (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")

    metrics = trainer.train(resume=resume)
    if trainer.is_main:
        export(run_dir)
    return Run(run_dir, metrics, config)


def export(run_dir: Path) -> Path:
    """Copy the best (else last) checkpoint's HF files to ``run_dir/model`` atomically."""
    checkpoints = run_dir / "checkpoints"
    source = ckpt.last_checkpoint(checkpoints, "best") or ckpt.last_checkpoint(checkpoints)
    if source is None:
        raise KilnError("no checkpoint to export", checkpoints)
    target = run_dir / "model"
    tmp, commit = ckpt.atomic_dir(target)
    for item in source.iterdir():
        if item.name not in MODEL_FILES_SKIP:
            shutil.copy2(item, tmp / item.name)
    commit()
    config = config_from_dict(json.loads((target / ckpt.KILN_FILE).read_text())["config"])
    if not config.train.keep_checkpoints:
        shutil.rmtree(checkpoints)
    return target
