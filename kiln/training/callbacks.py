"""Callbacks: what happens around the loop without being the loop (progress, reporting).

The trainer calls every callback's hooks in order; a callback never changes what is trained,
except that it may end training gracefully by setting ``trainer.should_stop = True``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.model_files import METRICS_FILE

if TYPE_CHECKING:
    from kiln.training.trainer import Trainer

log = logging.getLogger(__name__)


class Callback:
    """Hooks into the loop. Set ``trainer.should_stop = True`` to end training gracefully."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Called once, after set-up (and after restoring a resumed run)."""

    def on_step_end(self, trainer: Trainer, logs: dict | None) -> None:
        """Called after every optimizer step; ``logs`` is set on logging steps only."""

    def on_evaluate(self, trainer: Trainer, metrics: dict) -> None:
        """Called after each evaluation with its metrics."""

    def on_log(self, trainer: Trainer, record: dict) -> None:
        """Called on the main rank with every record written to ``metrics.jsonl`` (training windows
        and evaluations)."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Called once when training ends: finished, stopped early or interrupted."""

    def on_export(self, run_dir: Path, model_dir: Path) -> None:
        """Called on the main rank after the best model is exported to ``model_dir``."""


def duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class MetricsFileCallback(Callback):
    """Appends every record to ``RUN_DIR/metrics.jsonl``: one JSON object per line, on the main rank."""

    def on_log(self, trainer: Trainer, record: dict) -> None:
        if trainer.run_dir is None:
            return
        import json

        with open(trainer.run_dir / METRICS_FILE, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")


class SummaryCallback(Callback):
    """Prints what is about to be trained, once, at the start: model, data, batch, steps, the run."""

    def on_train_begin(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        from kiln.models import keep_in_fp32
        from kiln.training.batching import feature_lengths

        train = trainer.config.train
        params = sum(p.numel() for p in trainer.model.parameters())  # a sharded DTensor counts its full shape
        train_tokens = int(trainer.sampler.lengths.sum())
        eval_tokens = int(feature_lengths(trainer.eval_features).sum())
        batch = f"{train.batch_size} examples" if train.batch_size else f"{train.batch_tokens} tokens"
        d = trainer.description
        steps = f"budget {duration(trainer.budget)}" if trainer.budget else f"{trainer.total_steps} steps"
        lines = [
            f"kiln train {d.get('task', trainer.task.name)} · {d.get('name', '')}",
            f"  profile   {d.get('profile', trainer.config.name)} ({d.get('init', 'from scratch')})",
            f"  model     {params / 1e6:.2f}M parameters on {trainer.device} in {trainer.precision}"
            + (f" ({note})" if trainer.precision != "fp32" and (note := keep_in_fp32(trainer.model)) else ""),
            f"  train     {len(trainer.train_features)} examples, {train_tokens} tokens",
            f"  valid     {len(trainer.eval_features)} examples, {eval_tokens} tokens",
            f"  batch     {batch} x {train.grad_accum * trainer.world_size} (accumulation x ranks) per step, "
            f"{steps}, lr {trainer.config.optim.lr:g} ({trainer.config.schedule.name})",
        ]
        speed = [*(["torch.compile (inductor)"] if trainer.compile_watch else []),
                 *(["eager attention (faster for short inputs on a CPU)"] if trainer.attention == "eager" else [])]
        if speed:
            lines.append("  speed     " + "; ".join(speed))
        if trainer.world_size > 1:
            lines.append(f"  ranks     {trainer.world_size} processes, {trainer.strategy.name}"
                         + (f" ({train.fsdp})" if trainer.strategy.name == "fsdp" else ""))
        if d.get("head"):
            lines.insert(2, f"  new       {d['head']}")
        if d.get("lora"):
            lines.insert(3, f"  adapters  {d['lora']}")
        lines[-1:-1] = [f"  {note}" for note in d.get("notes") or ()]  # the task's: its labels, weights
        if trainer.run_dir:
            lines.append(f"  run       {trainer.run_dir}")
        log.info("\n".join(lines))
        short = trainer.total_steps <= 10  # over by the time an ETA could be timed
        self.eta_at = None if trainer.state.step or trainer.budget or short else 10

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.is_main and trainer.compile_watch is not None:
            log.info(f"  compile   {trainer.compile_watch.summary()}")

    def on_step_end(self, trainer: Trainer, logs: dict | None) -> None:
        if trainer.is_main and trainer.state.step == getattr(self, "eta_at", None):
            per_step = trainer.state.train_seconds / trainer.state.step
            log.info(f"  ETA       {duration(per_step * (trainer.total_steps - trainer.state.step))}"
                     f" for {trainer.total_steps} steps (timed over the first {trainer.state.step})")


class ProgressCallback(Callback):
    """Training progress on stderr: a tqdm bar on a terminal, plain lines anywhere else.

    Off a terminal (nohup, SLURM, CI, a notebook's log) a bar is noise, and nothing at all between
    evaluations looks like a hang. There a line goes out at logging steps (``train.log_every``),
    at most every ``min_interval`` seconds, and at least every ``max_interval`` seconds:
    step/total, loss, learning rate, tokens/s, elapsed and ETA. Only the main rank reports, and
    only when the ``kiln`` logger shows INFO.
    """

    def __init__(self, min_interval: float = 5.0, max_interval: float = 60.0):
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.bar: Any = None
        self.enabled = False

    def on_train_begin(self, trainer: Trainer) -> None:
        self.enabled = trainer.is_main and log.isEnabledFor(logging.INFO)
        self.last_time = time.perf_counter()
        self.last_tokens = trainer.state.tokens_seen
        self.start_step = trainer.state.step
        self.start_seconds = trainer.state.train_seconds
        self.lines = 0
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            total = trainer.total_steps if not trainer.budget else None
            self.bar = tqdm(total=total, initial=trainer.state.step, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def on_step_end(self, trainer: Trainer, logs: dict | None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}",
                                     tok_s=f"{logs['tokens_per_s']:.0f}")
            return
        since = time.perf_counter() - self.last_time
        if (logs and (self.lines == 0 or since >= self.min_interval)) or since >= self.max_interval:
            log.info(self.line(trainer, logs, since))
            self.lines += 1
            self.last_time = time.perf_counter()
            self.last_tokens = trainer.state.tokens_seen

    def line(self, trainer: Trainer, logs: dict | None, since: float) -> str:
        """One plain progress line."""
        state = trainer.state
        if logs is None:  # a time-based line between logging steps: the last step's loss
            logs = {"loss": float(trainer.step_loss), "lr": trainer.optimizer.param_groups[0]["lr"],
                    "tokens_per_s": (state.tokens_seen - self.last_tokens) / max(since, 1e-9)}
        if trainer.budget:
            total, left = "", max(trainer.budget - state.train_seconds, 0.0)
        else:
            done = state.step - self.start_step
            per_step = (state.train_seconds - self.start_seconds) / max(done, 1)
            total, left = f"/{trainer.total_steps}", per_step * (trainer.total_steps - state.step)
        return (f"  step {state.step}{total}  loss {logs['loss']:.4f}  lr {logs['lr']:.2e}  "
                f"{logs['tokens_per_s']:,.0f} tok/s  elapsed {duration(state.train_seconds)}  ETA {duration(left)}")

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# -- trackers (train.report_to) ------------------------------------------------------------------
# Each reports what metrics.jsonl holds, under the same names, plus the resolved config. Their
# packages are optional extras, imported only when a run asks for them: importing mlflow alone
# takes seconds, and `kiln --help` must stay instant.

TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "TensorBoard"), "mlflow": ("mlflow", "MLflow")}


def tracking_callbacks(report_to: str) -> list[Callback]:
    """The trackers ``train.report_to`` names (``tensorboard,mlflow``), not started yet.

    A tracker whose package is not installed is a :class:`~kiln.errors.KilnError` naming the extra
    that installs it. The check finds the package without importing it, so a run can make it before
    it reads any data or writes its directory.
    """
    import importlib.util

    from kiln.config import parse_report_to
    from kiln.errors import KilnError

    classes = {"tensorboard": TensorBoardCallback, "mlflow": MLflowCallback}
    trackers: list[Callback] = []
    for name in dict.fromkeys(parse_report_to(report_to)):
        package, shown = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise KilnError(f"report_to '{name}' needs {shown}: pip install 'kiln-nlp[{name}]'")
        trackers.append(classes[name]())
    return trackers


def flat_config(tree: dict) -> dict[str, Any]:
    """A config's ``to_dict()`` as dotted settings (``optim.lr``), the architecture's entries one by
    one (``model.config.hidden_size``): what trackers record as a run's hyperparameters."""
    from kiln.config import flatten

    flat = flatten(tree)
    architecture = flat.pop("model.config", None) or {}
    flat.update({f"model.config.{key}": value for key, value in architecture.items()})
    return flat


def record_scalars(record: dict) -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` record by key; ``step`` and text (``split``) left out."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)}


def _test_record(run_dir: Path) -> dict | None:
    """The test split's record when it is the last line of ``metrics.jsonl``, as ``kiln.train``
    appends it after the export (an older test record belongs to an earlier session)."""
    import json

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[-1]) if lines else {}
    return record if record.get("split") == "test" else None


def _run_status(error: BaseException | None) -> str:
    """MLflow's status for a training that ended with ``error`` (None: it finished or stopped early)."""
    from kiln.errors import RunStopped

    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt) or (isinstance(error, RunStopped) and error.exit_code == 0):
        return "KILLED"  # the user stopped it (Ctrl-C, SIGTERM); --resume continues it
    return "FAILED"


class TensorBoardCallback(Callback):
    """TensorBoard event files in ``RUN_DIR/tensorboard/``: ``tensorboard --logdir runs`` shows every run.

    Each ``metrics.jsonl`` record becomes scalars at its step: a training window's as ``train/loss``,
    ``train/lr``, ``train/grad_norm``…, an evaluation's as ``eval/accuracy``…, the test split's as
    ``test/accuracy``…. The resolved config is the text ``config``; at the end, the flattened config
    goes to the HParams dashboard with the best validation metrics (scalars ``best/<metric>``).

    A resumed run appends to the same directory, and TensorBoard hides what an earlier session logged
    past the checkpoint it resumes from (``purge_step``), so no step is shown twice.
    """

    def __init__(self, log_dir: str | Path | None = None):
        self.given = Path(log_dir) if log_dir else None
        self.log_dir: Path | None = None  # this run's: the given one, else RUN_DIR/tensorboard
        self.writer: Any = None

    def on_train_begin(self, trainer: Trainer) -> None:
        if not trainer.is_main or (self.given is None and trainer.run_dir is None):
            return
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        # Worked out for each run, so that one callback given to several kiln.train calls (a sweep)
        # logs each run in its own directory.
        self.log_dir = self.given if self.given is not None else Path(str(trainer.run_dir)) / "tensorboard"
        step = trainer.state.step
        # Resumed at step S: what the interrupted session logged after S is replayed now, so hide it.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step + 1 if step else None)
        if not step:
            meta = trainer.kiln_meta
            text = yaml.safe_dump({"task": meta.get("task"), "data": meta.get("data"), "init": meta.get("init"),
                                   **trainer.config.to_dict()}, sort_keys=False)
            # Indented: TensorBoard renders text as Markdown, where that is a code block.
            self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)
            self.writer.flush()

    def on_log(self, trainer: Trainer, record: dict) -> None:
        if self.writer is not None:
            self._scalars(self.writer, record)

    @staticmethod
    def _scalars(writer: Any, record: dict) -> None:
        split = record.get("split")
        group = {None: "train", "validation": "eval"}.get(split, split) or "train"
        for key, value in record_scalars(record).items():
            writer.add_scalar(f"{group}/{key.removeprefix(group + '_')}", value, record.get("step") or 0)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is None:
            return
        hparams = {"task": trainer.kiln_meta.get("task", ""), "init": trainer.kiln_meta.get("init") or "scratch"}
        for key, value in flat_config(trainer.config.to_dict()).items():
            # The HParams plugin takes numbers, text and booleans; lists, dicts and nulls go as JSON.
            hparams[key] = value if isinstance(value, int | float | str | bool) else json_text(value)
        best = trainer.best_metrics or trainer.last_metrics
        metrics = {f"best/{key}": value for key, value in record_scalars(best).items() if key != "n"}
        # run_name ".": into this run's own directory, not a new timestamped run beside it.
        self.writer.add_hparams(hparams, metrics, run_name=".", global_step=trainer.state.step)
        self.writer.close()
        self.writer = None

    def on_export(self, run_dir: Path, model_dir: Path) -> None:
        record = _test_record(run_dir) if self.log_dir is not None else None
        if record is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(self.log_dir)) as writer:  # the test split is scored after training ended
            self._scalars(writer, record)


def json_text(value: Any) -> str:
    """``value`` as compact JSON (``[0.9,0.999]``, ``null``), for trackers that take text only."""
    import json

    return json.dumps(value, separators=(",", ":"), default=str)


def _artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlartifacts/`` beside a SQLite store (MLflow's
    default is ``./mlruns`` in the working directory); None elsewhere, where the server decides."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = tracking_uri.removeprefix("sqlite:///").split("?")[0]
    if database in ("", ":memory:"):
        return None
    return (Path(database).resolve().parent / "mlartifacts").as_uri()


class MLflowCallback(Callback):
    """Reports a run to MLflow: the flattened config as params, every ``metrics.jsonl`` record as
    metrics under the same names and steps, the exported ``model/`` as an artifact.

    The store is ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else SQLite next to the run
    directories, ``OUTPUT_DIR/mlflow.db``, with artifacts in ``OUTPUT_DIR/mlartifacts/`` (MLflow's own
    default would write ``./mlruns`` in the working directory). Browse it with
    ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``. The experiment is ``experiment``,
    else ``MLFLOW_EXPERIMENT_NAME``, else ``kiln``; the MLflow run is named after the kiln run and
    tagged with its task, profile, init and kiln version.

    The run ends FINISHED, KILLED when the user stopped training (Ctrl-C, SIGTERM), FAILED otherwise
    (at the latest when the process exits). ``RUN_DIR/mlflow.json`` remembers the run, so that
    ``--resume`` continues the same MLflow run.
    """

    RUN_FILE = "mlflow.json"

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.client: Any = None
        self.run_id: str | None = None
        self.ended = False

    def on_train_begin(self, trainer: Trainer) -> None:
        if not trainer.is_main or trainer.run_dir is None:
            return  # without a run directory nothing is logged: nothing to report
        import atexit
        import os

        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # kiln is offline: MLflow sends no usage data
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        if not log.isEnabledFor(logging.INFO):  # --quiet: MLflow's notes (creating its tables) too
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        from mlflow.exceptions import MlflowException

        from kiln.errors import KilnError

        run_dir = trainer.run_dir.resolve()
        self.ended = False
        uri = (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or f"sqlite:///{(run_dir.parent / 'mlflow.db').as_posix()}")
        try:
            self._start(trainer, run_dir, uri, Param, MlflowClient, MAX_PARAM_VAL_LENGTH)
        except (MlflowException, OSError) as err:  # a store that cannot be reached or written: one line
            self.run_id = None
            text = str(getattr(err, "message", None) or err).strip()
            first = text.splitlines()[0] if text else type(err).__name__
            raise KilnError(f"MLflow tracking store {uri}: {first} (--report-to none trains without it; "
                            f"--resume continues this run)") from None
        # A crash skips on_train_end: mark the run FAILED when the process exits rather than leave it RUNNING.
        atexit.register(self._end, "FAILED")

    def _start(self, trainer: Trainer, run_dir: Path, uri: str, Param: Any, MlflowClient: Any,
               max_length: int) -> None:
        import json

        self.client = MlflowClient(uri)
        self.run_id = self._reopen(run_dir, uri)
        if self.run_id is None:
            meta = trainer.kiln_meta
            tags = {"task": meta.get("task", ""), "profile": meta.get("profile", trainer.config.name),
                    "init": meta.get("init") or "scratch", "kiln_version": meta.get("kiln_version", ""),
                    "run_dir": str(run_dir)}
            run = self.client.create_run(self._experiment_id(uri), run_name=self.run_name or run_dir.name,
                                         tags={k: str(v) for k, v in tags.items()})
            self.run_id = run.info.run_id
            # Cut to MLflow's limit on a param's length (6000 in MLflow 3) rather than fail on a long value.
            params = [Param(key, (value if isinstance(value, str) else json_text(value))[:max_length])
                      for key, value in flat_config(trainer.config.to_dict()).items()]
            self.client.log_batch(self.run_id, params=params)  # MLflow sends them in batches of 100
            (run_dir / self.RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")

    def _reopen(self, run_dir: Path, uri: str) -> str | None:
        """The MLflow run of an earlier session of this kiln run (``--resume``), running again."""
        import json

        from mlflow.exceptions import MlflowException

        try:
            saved = json.loads((run_dir / self.RUN_FILE).read_text())
            if saved["tracking_uri"] != uri:
                return None
            run = self.client.get_run(saved["run_id"])
        except (OSError, ValueError, KeyError, TypeError, MlflowException):  # none, or gone from the store
            return None
        if run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    def _experiment_id(self, uri: str) -> str:
        import os

        from mlflow.exceptions import MlflowException

        from kiln.errors import KilnError

        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "kiln"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=_artifact_location(uri))
            except MlflowException:  # another run created it meanwhile
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise KilnError(f"MLflow experiment '{name}' is deleted: restore it (mlflow experiments restore) "
                            "or choose another with MLFLOW_EXPERIMENT_NAME")
        return experiment.experiment_id

    def on_log(self, trainer: Trainer, record: dict) -> None:
        if self.run_id is None:
            return
        from mlflow.exceptions import MlflowException

        try:
            self._metrics(record)
        except MlflowException as err:  # a tracking server gone for a while must not end a long run
            log.warning(f"  MLflow: step {record.get('step')} not logged ({str(err.message).strip()[:200]}); "
                        "metrics.jsonl has it")

    def _metrics(self, record: dict) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        step = record.get("step") or 0
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, timestamp, step)
                                                    for key, value in record_scalars(record).items()])

    def on_train_end(self, trainer: Trainer) -> None:
        self._end(_run_status(sys.exception()))  # inside the trainer's `except`: what stopped training

    def _end(self, status: str) -> None:
        import atexit

        atexit.unregister(self._end)
        if self.run_id is not None and not self.ended:
            self.ended = True
            self.client.set_terminated(self.run_id, status)

    def on_export(self, run_dir: Path, model_dir: Path) -> None:
        if self.run_id is None:
            return
        # Logged after the run ended (its end time is training's): the model, then the test split's scores.
        self.client.log_artifacts(self.run_id, str(model_dir), artifact_path="model")
        record = _test_record(run_dir)
        if record is not None:
            self._metrics(record)
