"""``kiln.train``: from a data path and a profile to a run directory with an exported model.

A run directory ``runs/NAME/`` holds ``config.yaml`` (the resolved configuration), ``metrics.jsonl``,
``checkpoints/{best,last}/`` and ``model/``, the best model in HF format plus ``kiln.json``.
All input is read and validated before the directory is created, so bad input never leaves a
half-written run behind.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from kiln.config import Config, ConfigBuilder, config_from_dict, resolve_key, resume_config
from kiln.errors import ColumnsMismatch, KilnError, MissingLabels
from kiln.files import read_json, write_text_atomic
from kiln.metrics import metrics_line
from kiln.model_files import ADAPTER_FILES, METRICS_FILE, RUN_FILE
from kiln.tasks import get_task
from kiln.tasks.base import Dataset
from kiln.training import checkpoint as ckpt
from kiln.version import __version__

MODEL_FILES_SKIP = {ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE, ckpt.MANIFEST_FILE}
log = logging.getLogger(__name__)


@dataclass
class Run:
    """A finished (or resumed) training run."""

    path: Path
    metrics: dict
    config: Config
    test_metrics: dict = field(default_factory=dict)  # on the labelled test split, when DATA has one

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
    from kiln.training.distributed import world

    return world()[0] == 0


def check_run_name(name: str) -> None:
    """A run name is one plain directory name: ``output_dir / name`` must never point elsewhere
    (``..``, ``.``, ``a/b`` or an absolute path would, and --overwrite deletes that directory)."""
    if not isinstance(name, str) or not name:
        raise KilnError("a run needs a name (-n NAME): its directory inside --output-dir")
    if (name in (".", "..") or any(c in name for c in "/\\\0")
            or PurePath(name).name != name):  # the last: Windows drives (C:x)
        raise KilnError(f"run name {name!r} must be a plain directory name: no '/' or '\\', not '.' "
                        "or '..'; use --output-dir to choose where runs go")


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def replaceable_run(run_dir: Path, output_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a kiln run for --overwrite to delete (False: it is empty).

    Raises a KilnError for anything else: kiln deletes only a directory that is a kiln run (has
    ``run.json``), is no symbolic link, and lies directly inside ``output_dir``.
    """
    if run_dir.is_symlink():
        if _is_nonempty_dir(run_dir):
            raise KilnError(f"is a symbolic link (to {run_dir.resolve()}); kiln will not delete through it, "
                            "remove the link or choose another name", run_dir)
        if run_dir.exists():
            return False  # a link to an empty directory: nothing to delete, training writes there
        raise KilnError("is a broken symbolic link; remove it or choose another name", run_dir)
    if not run_dir.exists():
        return False
    if not run_dir.is_dir():
        raise KilnError("exists and is not a directory; kiln will not delete it, choose another name",
                        run_dir)
    if not any(run_dir.iterdir()):
        return False
    if run_dir.resolve().parent != Path(output_dir).resolve():
        raise KilnError(f"is not inside the output directory {output_dir}; kiln will not delete it",
                        run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise KilnError(f"is not empty and not a kiln run (no {RUN_FILE}); kiln will not delete it, "
                        "choose another name or remove it yourself", run_dir)
    return True


def resolve_config(task: str, profile: str | None, init: str | None, flags: dict[str, Any],
                   overrides: Sequence[str] = ()) -> ConfigBuilder:
    """Merge profile (default: the task's own; with --init, the fine-tuning recipe for pretrained
    starts, ``_finetune``, or ``_generation``) and overrides."""
    from kiln.profiles import builder_for

    dotted = {resolve_key(k): v for k, v in flags.items() if v is not None}
    builder = builder_for(profile_for(task, profile, init), dotted, overrides)
    if builder.values["lora.r"] and builder.sources["optim.lr"] in ("default", "profile"):
        # The recipe's rate is full fine-tuning's; a rate the user gave (flag, -c, their YAML) stands.
        builder.set("optim.lr", builder.values["lora.lr"], "lora.lr")
    return builder


def profile_for(task: str, profile: str | None, init: str | None) -> str:
    """The profile a run starts from: the one given, else the task's own (with --init, its recipe for a
    pretrained start)."""
    from kiln.tasks import task_class

    face = task_class(task)
    return profile or (face.init_profile if init else face.default_profile)


def give_pad_token(tok: Any, model: Any, start: Path) -> None:
    """A start whose tokenizer has no pad token (GPT-2, Llama) pads with its eos token, as HF
    fine-tuning recipes do: the attention mask keeps it out of the model's view, and the model's
    config learns the id (a sequence head finds each text's last token by it)."""
    if tok.eos_token is None:
        raise KilnError("the tokenizer has neither a pad token nor an eos token to pad with; add a pad token "
                        "to it (tokenizer.add_special_tokens) or pass --tokenizer", start)
    tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    log.info(f"  {start} has no pad token: padding with its eos token {tok.eos_token!r}")


LENGTH_SETTINGS = ("train.epochs", "train.max_steps", "train.budget")


def check_same_start(run_dir: Path, saved: dict, task: str, data: str | Path, profile: str | None,
                     init: str | Path | None) -> None:
    """Refuse a ``--resume`` whose task, data, profile or ``--init`` is not the run's own: it would
    silently continue the saved run while the command line says another."""
    given = []
    if task != saved["task"]:
        given.append(f"task {task} (the run's is {saved['task']})")
    if Path(data).resolve() != Path(saved["data"]).resolve():
        given.append(f"data {data} (the run's is {saved['data']})")
    if profile is not None and saved.get("profile") is not None:
        name = resolve_config(task, profile, None, {}).build().name
        if name != saved["profile"]:
            given.append(f"profile {profile} (the run's is {saved['profile']})")
    if init is not None:
        from kiln.pretrained import resolve_init

        if not saved.get("init") or resolve_init(init).resolve() != Path(saved["init"]).resolve():
            given.append(f"--init {init} (the run's is {saved.get('init') or 'none: it started from scratch'})")
    if given:
        raise KilnError(f"--resume continues this run as it started, but the command gives {'; '.join(given)}: "
                        "give the run's own, or start a new run (another -n)", run_dir)


def fingerprint(splits: dict[str, Any]) -> dict[str, str]:
    """``{file: "BYTES:SHA256"}`` of every data file (resolved): what a resume checks is unchanged."""
    from kiln.pretrained import sha256

    found = {}
    for files in splits.values():
        for path in files if isinstance(files, list | tuple) else [files]:
            path = Path(path).resolve()
            if path.is_file():
                found[str(path)] = f"{path.stat().st_size}:{sha256(path)}"
    return found


def _read_splits(task: Any, data: str | Path) -> tuple[Dataset, Dataset, Dataset | None, dict[str, str]]:
    """``(train, validation, labelled test or None, {split: where it comes from})``."""
    splits = task.find_splits(data)
    train = task.read(splits["train"])
    if "validation" in splits:
        validation = task.read(splits["validation"])
    else:
        train, validation = task.holdout(train)
    test = _read_test(task, splits["test"]) if "test" in splits else None
    fraction = task.config.data.validation_fraction
    sources = {name: _shown(splits[name]) for name in ("train", "validation", "test") if name in splits}
    sources.setdefault("validation", f"{fraction:.0%} of {sources['train']}, held out at random")
    return train, validation, test, sources


def _shown(files: Any) -> str:
    return ", ".join(map(str, files)) if isinstance(files, list | tuple) else str(files)


def _read_test(task: Any, path: Any) -> Dataset | None:
    """The test split when it has labels (evaluated at the end of training), else None with one line:
    a file without labels, or laid out unlike the training data (GLUE's test files). A labelled file
    with a bad row is an error like any other data file."""
    try:
        return task.read(path)
    except ColumnsMismatch as err:  # a warning: a misspelt header column would hide here
        log.warning(f"{_shown(path)}: test split not evaluated: its columns do not fit the training data's "
                 f"({err.message})")
    except MissingLabels:
        task.read(path, labelled=False)  # unreadable even without labels: that error is the user's to see
        log.info(f"{_shown(path)}: test split has no labels, not evaluated")
    return None


def _checked_test(task: Any, test: Dataset) -> Dataset | None:
    """The test split, or None when it lacks the labels the trained task needs (STS-B's test file has
    pairs but no scores); a label the training data never had stays an error."""
    try:
        task.check(test)
    except MissingLabels as err:
        log.info(f"{_shown(test.path)}: test split has no labels ({err.message}), not evaluated")
        return None
    return test


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
    command: str | None = None,
    **flags: Any,
) -> Run:
    """Train a model for ``task`` on ``data`` and export it to ``output_dir/name/model``.

    ``flags`` are settings by leaf or dotted name (``epochs=1``, ``lr=1e-3``,
    ``**{"model.config.num_hidden_layers": 2}``); ``overrides`` are ``key=value`` strings as ``-c``.
    ``command`` is what the model card says made the run (the CLI passes its command line; from
    Python it is this call). A labelled ``test.*`` split in ``data`` is scored at the end
    (``Run.test_metrics``).
    """
    import torch

    from kiln.training.device import resolve_device, resolve_precision
    from kiln.training.trainer import Trainer

    check_run_name(name)
    run_dir = Path(output_dir) / name
    if resume:
        start = _resumed_start(run_dir, task, data, profile, init, flags, overrides)
    else:
        start = _new_start(run_dir, output_dir, task, data, profile, init, flags, overrides, overwrite)
    config, task, data, init = start.config, start.task, start.data, start.init
    if is_main_process():  # trackers (train.report_to): a missing package fails before any work is done
        from kiln.training.callbacks import tracking_callbacks

        callbacks = [*callbacks, *tracking_callbacks(config.train.report_to)]
    task_obj, splits = _checked_data(task, data, config, start.saved_meta, resume)
    # Device and precision errors are user errors too: raise them before anything is written.
    precision = resolve_precision(config.train.precision, resolve_device(config.train.device))

    torch.manual_seed(config.train.seed)
    model, tok, init_dir = _model_and_tokenizer(task_obj, config, run_dir, start.saved_meta, init, tokenizer,
                                                splits.train, resume)
    meta, features = _prepared(task_obj, config, model, tok, splits, precision, start, init_dir,
                               command or _python_call(task, data, name, profile, init, flags, overrides))
    description = {"task": task, "name": name, "profile": config.name, "notes": task_obj.notes(),
                   "lora": _lora_line(model, config), "head": None if resume else task_obj.load_note,
                   "init": _start_line(meta, config, task_obj)}
    trainer = Trainer(model, task_obj, config, tok, *features, run_dir=run_dir, callbacks=list(callbacks),
                      kiln_meta=meta, description=description)
    if is_main_process():  # only now: every check above has passed
        _write_run_files(run_dir, output_dir, meta, config, start, resume, overwrite)

    metrics, is_main = trainer.train(resume=resume), trainer.is_main
    del trainer, model  # the test split loads the exported model: free the training copy first
    return Run(run_dir, metrics, config, _finish(run_dir, splits.test, config, callbacks) if is_main else {})


def _lora_line(model: Any, config: Config) -> str | None:
    from kiln.training import lora

    return lora.describe(model, config.lora) if lora.is_adapted(model) else None


@dataclass
class _Start:
    """What a run starts from: its settings, task, data and init (a resumed run's are those it saved)."""

    config: Config
    task: str
    data: str | Path
    init: str | Path | None
    saved_meta: dict = field(default_factory=dict)
    changes: list = field(default_factory=list)  # (key, old, new) settings a resume changes


@dataclass
class _Splits:
    train: Dataset
    validation: Dataset
    test: Dataset | None
    sources: dict
    data_files: dict


def _resumed_start(run_dir: Path, task: str, data: str | Path, profile: str | None, init: str | Path | None,
                   flags: dict, overrides: list[str] | tuple[str, ...]) -> _Start:
    """The saved run's settings (with the changes a resume may make), once its checkpoints check out."""
    if not (run_dir / "config.yaml").is_file():
        raise KilnError("nothing to resume: no config.yaml in the run directory", run_dir)
    saved_meta = read_json(run_dir / RUN_FILE, required=("task", "data", "config"))
    checkpoints = run_dir / "checkpoints"
    belongs = ckpt.same_run(saved_meta)
    for saved in (ckpt.last_checkpoint(checkpoints, strict=True, belongs=belongs),
                  ckpt.last_checkpoint(checkpoints, "best")):
        if saved is not None:  # a damaged file is reported now, not after reading the data
            ckpt.verify_checkpoint(saved)
    check_same_start(run_dir, saved_meta, task, data, profile, init)
    config, changes = resume_config(config_from_dict(saved_meta["config"]), flags, overrides)
    for key, old, new in changes:
        log.info(f"  resuming with {key} {old!r} -> {new!r}"
                 + (" (the schedule follows the new length from here)" if key in LENGTH_SETTINGS else ""))
    return _Start(config, saved_meta["task"], saved_meta["data"], saved_meta.get("init"), saved_meta, changes)


def _start_line(meta: dict, config: Config, task_obj: Any) -> str:
    """Where the model's weights came from, for the summary."""
    if meta["init"]:
        return f"from {meta['init']}"
    if config.distill.teacher and task_obj.starts_from_teacher:
        return "from the teacher's weights"
    return "from scratch"


def _new_start(run_dir: Path, output_dir: str | Path, task: str, data: str | Path, profile: str | None,
               init: str | Path | None, flags: dict, overrides: list[str] | tuple[str, ...],
               overwrite: bool) -> _Start:
    """The settings of a new run, once its directory may be (re)used."""
    builder = resolve_config(task, profile, str(init) if init else None, flags, overrides)
    log.debug("settings not at their defaults: " + ", ".join(
        f"{key}={value!r} ({source})" for key, value, source in builder.described() if source != "default"))
    config = builder.build()
    if config.lora.r and not init:
        raise KilnError("--lora adapts a pretrained start: give --init DIR (a model trained from scratch has "
                        "nothing worth freezing)")
    if config.lora.r:
        from kiln.training import lora

        lora.require_peft()
    if is_main_process() and (run_dir.exists() or run_dir.is_symlink()):
        if overwrite:
            replaceable_run(run_dir, output_dir)  # raises for anything kiln must not delete
        elif not run_dir.is_dir() or any(run_dir.iterdir()):  # an empty directory is reused
            hint = ("use --resume to continue it or --overwrite to start over"
                    if (run_dir / RUN_FILE).is_file() else "it is not a kiln run; choose another name")
            raise KilnError(f"run directory already exists; {hint}", run_dir)
    return _Start(config, task, data, init)


def _checked_data(task: str, data: str | Path, config: Config, saved_meta: dict, resume: bool) -> tuple[Any, _Splits]:
    """The task (fitted to the training split on a new run) and the splits, every check passed."""
    task_obj: Any = get_task(task, config, saved_meta.get("task_state"))
    if config.distill.teacher:  # the student learns from the teacher too (kiln distill)
        from kiln.distill import Distillation

        task_obj = Distillation(task_obj, config.distill)
    if task not in config.tasks:
        raise KilnError(f"profile '{config.name}' does not support task '{task}' "
                        f"(it supports {', '.join(config.tasks)})")
    train_ds, validation_ds, test_ds, sources = _read_splits(task_obj, data)
    data_files = fingerprint(task_obj.find_splits(data))
    if resume and saved_meta.get("data_files", data_files) != data_files:
        changed = sorted(set(saved_meta["data_files"].items()) ^ set(data_files.items()))
        raise KilnError("the data changed since the run started, so resuming would not continue the same run: "
                        "restore it, or start a new run (another -n, or --overwrite)", changed[0][0])
    try:
        if not resume:
            task_obj.fit(train_ds)
        if config.distill.teacher:
            task_obj.prepare(train_ds)
        task_obj.check(validation_ds)
        if test_ds is not None:
            test_ds = _checked_test(task_obj, test_ds)
    except KilnError as err:
        if validation_ds.path == train_ds.path == err.path and not resume:  # split from one file: say so
            err.message += (f" (validation is {len(validation_ds)} of the file's "
                            f"{len(train_ds) + len(validation_ds)} examples, held out at random; "
                            "more data or a validation file helps)")
        raise
    if not (config.train.epochs or config.train.max_steps or config.train.budget):
        raise KilnError("setting 'train.epochs' is 0, and neither max_steps nor a budget is set: nothing to train")
    if config.train.metric and config.train.metric not in task_obj.metric_names():
        raise KilnError(f"setting 'train.metric': '{config.train.metric}' is not one of this task's metrics "
                        f"({', '.join(task_obj.metric_names())})")
    return task_obj, _Splits(train_ds, validation_ds, test_ds, sources, data_files)


def _model_and_tokenizer(task_obj: Any, config: Config, run_dir: Path, saved_meta: dict,
                         init: str | Path | None, tokenizer: str | Path | None, train_ds: Dataset,
                         resume: bool) -> tuple[Any, Any, Path | None]:
    """``(model, tokenizer, init directory)``: the last checkpoint's on a resume, the pretrained
    start's with ``init``, else a tokenizer trained on the data (or given) and a model built from the
    profile's architecture."""
    from kiln.models import architecture_errors, hf_config, max_positions
    from kiln.tokenizers import load_tokenizer, train_tokenizer

    last = ckpt.last_checkpoint(run_dir / "checkpoints", belongs=ckpt.same_run(saved_meta)) if resume else None
    if last is not None and saved_meta.get("lora"):
        from kiln.training import lora

        return lora.adapted_start(task_obj, last, saved_meta["lora"]), load_tokenizer(last), None
    if last is not None:
        return task_obj.load_model(last), load_tokenizer(last), None
    if init:
        from kiln.pretrained import resolve_init

        init_dir = resolve_init(init)
        tok = load_tokenizer(tokenizer or init_dir)
        model = task_obj.load_model(init_dir, ignore_mismatched_sizes=True, **task_obj.model_kwargs())
        if task_obj.needs_pad_token and tok.pad_token is None:
            give_pad_token(tok, model, init_dir)
        if config.lora.r:
            from kiln.training import lora

            model = lora.adapt(model, config.lora, task_obj.new_keys, init_dir)
        return model, tok, init_dir
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
    if config.distill.teacher:  # a student may start from a subset of the teacher's weights
        arch = task_obj.student_architecture(config.model.type, arch)
    with architecture_errors(config.name):
        model = task_obj.build_model(hf_config(config.model.type, arch, **task_obj.model_kwargs()))
    if config.distill.teacher:
        task_obj.start_student(model, tok)
    return model, tok, None


def _prepared(task_obj: Any, config: Config, model: Any, tok: Any, splits: _Splits, precision: str,
              start: _Start, init_dir: Path | None, command: str) -> tuple[dict, tuple[list, list, Dataset]]:
    """The run's record (``run.json``) and the Trainer's data: ``(train features, validation
    features, validation dataset)``."""
    from kiln.models import max_positions

    max_length = min(config.train.max_length, max_positions(model.config))
    task_obj.bind(tok)
    validation_ds = splits.validation
    # A few validation inputs, as kiln serve's /predict takes them, for its demo page (kiln.json).
    examples = task_obj.example_inputs(validation_ds)
    cap = task_obj.eval_cap()
    if cap and len(validation_ds) > cap:  # e.g. generation: decode a fixed sample at each evaluation
        validation_ds = Dataset(validation_ds.path, validation_ds.examples[:cap], extras=validation_ds.extras)

    train_features = task_obj.encode(splits.train, tok, max_length)
    validation_features = task_obj.encode(validation_ds, tok, max_length)
    log.debug(f"data: {splits.sources}; {len(train_features)} training and {len(validation_features)} validation "
              f"features of at most {max_length} tokens; tokenizer of {len(tok)} tokens")
    init = init_dir or start.init
    meta = {
        "kiln_version": __version__,
        "task": start.task,
        "task_state": task_obj.state,
        "profile": config.name,
        "data": str(Path(start.data).resolve()),  # a resume from another directory reads the same files
        "data_files": splits.data_files,
        "init": str(init) if init else None,
        "max_length": max_length,
        "precision": precision,
        "splits": splits.sources,
        "examples": examples,
        "command": command,
        "config": config.to_dict(),
    }
    if config.distill.teacher:
        meta["teacher"] = {"path": str(task_obj.teacher_dir), "metrics": task_obj.teacher_metrics}
    if config.lora.r:  # the frozen start the adapters belong to, checked when it is loaded again
        from kiln.training import lora

        meta["lora"] = start.saved_meta.get("lora") or lora.base_identity(Path(str(init)))
    return meta, (train_features, validation_features, validation_ds)


def _write_run_files(run_dir: Path, output_dir: str | Path, meta: dict, config: Config, start: _Start,
                     resume: bool, overwrite: bool) -> None:
    """``run.json`` and ``config.yaml`` of a new run (replacing the old run with --overwrite), or a
    resumed run's ``run.json`` with the settings it changed."""
    if not resume:
        if overwrite and replaceable_run(run_dir, output_dir):  # checked again: the disk may have changed
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        # run.json first and each file whole: a kill here leaves a run that --resume or --overwrite takes
        write_text_atomic(run_dir / RUN_FILE, json.dumps(meta, indent=2) + "\n")
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(
            {"task": start.task, "data": meta["data"], "init": meta["init"], **config.to_dict()}, sort_keys=False))
    elif start.changes:  # the next resume, and the report, see what this one ran
        write_text_atomic(run_dir / RUN_FILE, json.dumps({**start.saved_meta, "config": config.to_dict()},
                                                              indent=2) + "\n")


def _finish(run_dir: Path, test_ds: Dataset | None, config: Config, callbacks: list | tuple) -> dict:
    """Export the best checkpoint as ``model/``, score the test split, write the model card and tell
    the callbacks; returns the test split's metrics."""
    export(run_dir)
    test_metrics = evaluate_test(run_dir, test_ds, config.train.device) if test_ds is not None else {}
    from kiln.card import write_model_card

    write_model_card(run_dir)
    for callback in callbacks:  # last: trackers get the test split's scores and a model with its card
        callback.on_export(run_dir, run_dir / "model")
    return test_metrics


def evaluate_test(run_dir: Path, test: Dataset, device: str) -> dict:
    """Score the exported model on the labelled test split as ``kiln evaluate`` would, and record
    the result in ``run.json``, ``metrics.jsonl`` and the log."""
    from kiln.predictor import Predictor

    predictor = Predictor(run_dir / "model", device=device)
    metrics = predictor.evaluate(test)
    meta = json.loads((run_dir / RUN_FILE).read_text())
    meta["test_metrics"] = metrics
    write_text_atomic(run_dir / RUN_FILE, json.dumps(meta, indent=2) + "\n")
    step = json.loads((run_dir / "model" / ckpt.KILN_FILE).read_text()).get("step")
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as out:
        out.write(json.dumps({"step": step, "split": "test", **{f"test_{k}": v for k, v in metrics.items()}}) + "\n")
    shown = metrics_line(metrics)
    log.info(f"  test      {shown} ({metrics['n']} examples, {test.path})")
    return metrics


def _python_call(task: str, data: Any, name: str, profile: str | None, init: Any, flags: dict,
                 overrides: Any) -> str:
    """The ``kiln.train(...)`` call of a run started from Python (the CLI records its command line)."""
    arguments = [repr(task), repr(str(data)), f"name={name!r}"]
    arguments += [f"{key}={value!r}" for key, value in (("profile", profile), ("init", init and str(init)))
                  if value]
    arguments += [f"**{{{key!r}: {value!r}}}" if "." in key else f"{key}={value!r}"
                  for key, value in flags.items() if value is not None]
    if overrides:
        arguments.append(f"overrides={list(overrides)!r}")
    return f"kiln.train({', '.join(arguments)})"


def export(run_dir: Path) -> Path:
    """Copy the best (else last) checkpoint's HF files to ``run_dir/model`` atomically."""
    checkpoints = run_dir / "checkpoints"
    source = ckpt.last_checkpoint(checkpoints, "best") or ckpt.last_checkpoint(checkpoints)
    if source is None:
        raise KilnError("no checkpoint to export", checkpoints)
    target = run_dir / "model"
    tmp, commit = ckpt.atomic_dir(target)
    try:
        for item in source.iterdir():
            if item.is_dir():  # a task's own modules (sentence-transformers' 1_Pooling/)
                shutil.copytree(item, tmp / item.name)
            elif item.name not in MODEL_FILES_SKIP | set(ADAPTER_FILES):
                shutil.copy2(item, tmp / item.name)
        if (source / ADAPTER_FILES[0]).is_file():
            _merge_adapters(source, tmp, run_dir / "adapter")
    except OSError as err:  # a full disk: the previous model/ (if any) stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise KilnError(f"could not export the model ({err.strerror or err}); {target} is unchanged; "
                        f"the checkpoint is in {source}", target) from None
    commit()
    config = config_from_dict(json.loads((target / ckpt.KILN_FILE).read_text())["config"])
    if not config.train.keep_checkpoints:
        shutil.rmtree(checkpoints)
    return target


def _merge_adapters(checkpoint: Path, tmp: Path, adapter_dir: Path) -> None:
    """A LoRA run's export: the start with the checkpoint's adapters merged, as plain transformers
    weights in ``tmp`` (the model directory being written), and the adapters alone in ``adapter_dir``
    (peft's layout: ``PeftModel.from_pretrained(start, adapter_dir)``)."""
    from kiln.training import lora

    meta = read_json(checkpoint / ckpt.KILN_FILE, required=("task", "config", "lora"))
    task_obj = get_task(meta["task"], config_from_dict(meta["config"]), meta.get("task_state"))
    merged = lora.merged_model(task_obj, checkpoint, meta["lora"])
    merged.save_pretrained(tmp, safe_serialization=True)
    adapter_tmp, commit = ckpt.atomic_dir(adapter_dir)
    for name in ADAPTER_FILES:
        shutil.copy2(checkpoint / name, adapter_tmp / name)
    commit()
