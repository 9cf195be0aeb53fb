"""``kiln tune``: hyperparameter search over ordinary kiln runs, on optuna.

Each trial is a ``kiln train`` run in ``OUTPUT_DIR/NAME/trial-NNN`` with settings drawn from a space
(a YAML of setting keys and ranges). Trials report their validation metric at every evaluation, and
the pruner (successive halving, median, or none) stops the poor ones early. The study lives in
``OUTPUT_DIR/NAME/study.db`` (SQLite), so a killed search resumes with ``--resume``: finished trials
are kept, and a trial that was running continues from its checkpoint. At the end the best trial's
settings are written as a profile (``best.yaml``), usable as ``kiln train --profile``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.config import coerce, parse_duration, resolve_key
from kiln.errors import KilnError, RunStopped
from kiln.training.callbacks import Callback

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"
BEST_FILE = "best.yaml"
TRIAL_FILE = "tune.json"  # in each trial's run directory: its number, parameters and outcome
PRUNERS = ("asha", "median", "none")
FAILING_START = 3  # this many trials failing before any finishes: the space itself is wrong
INSTALL = "kiln tune needs optuna: pip install 'kiln-nlp[tune]' (or pip install optuna)"

# The default spaces: from scratch a wide learning rate and large batches; from a pretrained start the
# small steps fine-tuning wants (as the _finetune recipe).
SCRATCH_SPACE = {"optim.lr": {"log": [1e-4, 3e-3]}, "train.batch_tokens": [2048, 4096, 8192],
                 "train.epochs": {"int": [1, 5]}, "optim.weight_decay": [0.0, 0.01, 0.1],
                 "schedule.warmup_ratio": {"float": [0.0, 0.2]}}
PRETRAINED_SPACE = {"optim.lr": {"log": [1e-5, 2e-4]}, "train.batch_tokens": [512, 1024, 2048],
                    "train.epochs": {"int": [1, 4]}, "optim.weight_decay": [0.0, 0.01, 0.1],
                    "schedule.warmup_ratio": {"float": [0.0, 0.2]}}


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise KilnError(INSTALL) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # kiln says what happens, in its own lines
    return optuna


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One setting of the space: ``log``/``float``/``int`` between two bounds, or a ``choice``."""

    key: str
    kind: str
    values: tuple

    def sample(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(self.key, low, high)
        return trial.suggest_float(self.key, low, high, log=self.kind == "log")


def parse_space(tree: Any, where: str = "", lines: dict[str, int] | None = None) -> list[Dimension]:
    """The dimensions of a space: ``{key: [choices] | {log: [lo, hi]} | {float: [lo, hi]} | {int: [lo,
    hi]}}``, each key a kiln setting and each value one it accepts. A bad entry is a KilnError naming
    its line in the YAML."""
    if not isinstance(tree, dict) or not tree:
        raise KilnError("a space maps setting keys to ranges, e.g. optim.lr: {log: [1e-5, 1e-3]}", where or None)
    dimensions = []
    for key, spec in tree.items():
        line = (lines or {}).get(str(key))
        try:
            dimensions.append(_dimension(str(key), spec))
        except KilnError as err:
            raise KilnError(err.message, where or None, line) from None
    return dimensions


def _dimension(key: str, spec: Any) -> Dimension:
    dotted = resolve_key(key)

    def check(value: Any) -> Any:  # the setting's own type and range; model.config.* is the architecture's
        return value if dotted.startswith("model.config.") else coerce(dotted, value)

    if isinstance(spec, list):
        if not spec:
            raise KilnError(f"{key}: an empty list of choices")
        return Dimension(dotted, "choice", tuple(check(value) for value in spec))
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("log", "float", "int")):
        raise KilnError(f"{key}: give a list of choices or one of {{log: [lo, hi]}}, {{float: [lo, hi]}}, "
                        f"{{int: [lo, hi]}}, not {spec!r}")
    kind, bounds = next(iter(spec.items()))
    numbers = (int,) if kind == "int" else (int, float)
    if not (isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(b, numbers) and not isinstance(b, bool) for b in bounds)):
        raise KilnError(f"{key}: {kind} takes two {'whole ' if kind == 'int' else ''}numbers [low, high], "
                        f"not {bounds!r}")
    low, high = bounds
    if not low < high or (kind == "log" and low <= 0):
        raise KilnError(f"{key}: {kind} needs low < high{' and low > 0' if kind == 'log' else ''}, not {bounds}")
    check(int(low) if kind == "int" else float(low))
    check(int(high) if kind == "int" else float(high))
    return Dimension(dotted, kind, (low, high))


def load_space(path: str | Path | dict | None, pretrained: bool) -> list[Dimension]:
    """The space in ``path`` (YAML; or the space itself, a dict), or the default one for a scratch or
    pretrained start."""
    if path is None or isinstance(path, dict):
        return parse_space(path or (PRETRAINED_SPACE if pretrained else SCRATCH_SPACE))
    from kiln.config import load_yaml
    from kiln.profiles import key_lines

    path = Path(path)
    try:
        tree = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise KilnError(f"cannot read the space ({err.strerror})", path) from None
    except Exception as err:  # a YAML syntax error: its own message has the line
        raise KilnError(f"not YAML: {str(err).splitlines()[0]}", path) from None
    return parse_space(tree, str(path), key_lines(path))


class TrialCallback(Callback):
    """Reports each evaluation to the trial, stops the run when the pruner says so, and stops it at
    the study's deadline (the search's ``--budget``)."""

    def __init__(self, trial: Any, metric: str, deadline: float | None):
        self.trial, self.metric, self.deadline = trial, metric, deadline
        self.stopped: str | None = None  # why the run stopped early: "pruned" or "budget"
        self.step = 0

    def on_evaluate(self, trainer: Any, metrics: dict) -> None:
        value = metrics.get(self.metric)
        if value is not None and math.isfinite(value):
            self.trial.report(float(value), trainer.state.step)
            if self.trial.should_prune():
                self.stopped, self.step, trainer.should_stop = "pruned", trainer.state.step, True

    def on_step_end(self, trainer: Any, logs: dict | None) -> None:
        if self.deadline is not None and time.time() >= self.deadline and not trainer.should_stop:
            self.stopped, self.step, trainer.should_stop = "budget", trainer.state.step, True


class TrialFailed(Exception):
    """A trial that could not run (a bad combination, out of memory): recorded as failed, and the search
    goes on."""


@dataclasses.dataclass
class Search:
    """What every trial of one search shares."""

    task: str
    data: str
    name: str
    folder: Path
    profile: str | None
    init: str | None
    space: list[Dimension]
    metric: str
    overrides: tuple[str, ...]
    deadline: float | None
    resume: str = "kiln tune with --resume"  # how to continue a stopped search (the CLI gives its command)

    def objective(self, trial: Any) -> float:
        """Train one trial's run and return its best validation metric."""
        optuna = _optuna()
        from kiln.run import train

        params = {dimension.key: dimension.sample(trial) for dimension in self.space}
        retry = trial.user_attrs.get("run")  # a trial that was running when the search was killed
        name = retry or f"trial-{trial.number:03d}"
        trial.set_user_attr("run", name)
        callback = TrialCallback(trial, self.metric, self.deadline)
        log.info(f"trial {trial.number} ({name}): " + ", ".join(f"{k}={_shown(v)}" for k, v in params.items()))
        try:
            run = self._train(train, name, params, callback, resume=bool(retry))
        except RunStopped as stop:
            if stop.exit_code:
                raise
            # Ctrl-C or SIGTERM: the trial stopped at a checkpoint; --resume continues it, then the search.
            trial.set_user_attr("interrupted", True)
            raise RunStopped(f"the search stopped; {name} has a checkpoint at its last step, and {self.resume} "
                             "continues it, then the search", exit_code=0) from None
        except (KilnError, RuntimeError, MemoryError, ValueError) as err:
            reason = err.message if isinstance(err, KilnError) else f"{type(err).__name__}: {err}".splitlines()[0]
            trial.set_user_attr("error", reason)
            self._record(name, trial.number, params, "failed", error=reason)
            log.info(f"trial {trial.number} failed: {reason}")
            raise TrialFailed(reason) from None
        value = run.metrics.get(self.metric)
        if callback.stopped:
            trial.set_user_attr("stopped", {"why": callback.stopped, "step": callback.step})
            self._record(name, trial.number, params, "pruned", step=callback.step, value=value,
                         why=callback.stopped)
            log.info(f"trial {trial.number} {'pruned' if callback.stopped == 'pruned' else 'stopped by the budget'} "
                     f"at step {callback.step}")
            raise optuna.TrialPruned()
        if value is None or not math.isfinite(value):
            raise TrialFailed(f"the run reported no finite {self.metric}")
        self._record(name, trial.number, params, "finished", value=value)
        log.info(f"trial {trial.number} finished: {self.metric} {value:.4f}")
        return float(value)

    def _train(self, train: Any, name: str, params: dict, callback: Callback, resume: bool) -> Any:
        options = {"name": name, "output_dir": self.folder, "profile": self.profile, "init": self.init,
                   "overrides": list(self.overrides), "callbacks": [callback], "metric": self.metric, **params}
        if resume:
            try:
                return train(self.task, self.data, resume=True, **options)
            except KilnError as err:  # killed before its first checkpoint: start it again
                log.info(f"{name}: not resumable ({err.message}); starting it again")
        return train(self.task, self.data, overwrite=(self.folder / name).exists(), **options)

    def _record(self, name: str, number: int, params: dict, state: str, **facts: Any) -> None:
        from kiln.files import write_text_atomic

        folder = self.folder / name
        if folder.is_dir():
            write_text_atomic(folder / TRIAL_FILE, json.dumps(
                {"trial": number, "state": state, "params": params, **facts}, indent=2) + "\n")


def _shown(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def tune(task: str, data: str | Path, *, name: str, profile: str | None = None, init: str | Path | None = None,
         output_dir: str | Path = "runs", trials: int = 20, budget: str = "", space: str | Path | dict | None = None,
         metric: str = "", jobs: int = 1, pruner: str = "asha", seed: int = 0, resume: bool = False,
         storage: str | None = None, overrides: Sequence[str] = (), command: str | None = None) -> Any:
    """Search ``space`` (default: :data:`SCRATCH_SPACE` or :data:`PRETRAINED_SPACE`) with ``trials``
    kiln runs of ``task`` on ``data`` in ``output_dir/name``, and return the optuna study.

    ``metric`` (default: the task's main metric) is maximised or minimised as the task judges it.
    ``budget`` bounds the whole search's wall clock; ``jobs`` runs that many trials at once, each in its
    own process with a share of the cores; ``storage`` (an optuna storage URL) lets several machines
    share the study."""
    optuna = _optuna()
    if pruner not in PRUNERS:
        raise KilnError(f"--pruner must be one of {', '.join(PRUNERS)}, not '{pruner}'")
    if trials < 1 or jobs < 1:
        raise KilnError("--trials and --jobs must be at least 1")
    dimensions = load_space(space, pretrained=init is not None)
    fixed = _overrides(overrides)  # a setting given with -c is fixed: the space does not search it
    for dimension in [d for d in dimensions if resolve_key(d.key) in fixed]:
        log.info(f"{dimension.key} is fixed by -c at {fixed[resolve_key(dimension.key)]}: not searched")
    dimensions = [d for d in dimensions if resolve_key(d.key) not in fixed]
    if not dimensions:
        raise KilnError("-c fixes every setting the space searches: nothing is left to search")
    folder = Path(output_dir) / name
    url = storage or f"sqlite:///{(folder / STUDY_FILE).resolve()}"
    exists = (folder / STUDY_FILE).is_file() if storage is None else _study_exists(optuna, url, name)
    if exists and not resume:
        raise KilnError(f"{folder} already holds a study: --resume continues it, or choose another -n", folder)
    if resume and not exists:
        raise KilnError("nothing to resume: no study here", folder / STUDY_FILE)
    metric, greater = _metric(task, data, profile, init, metric, overrides)
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=_storage(optuna, url), study_name=name, load_if_exists=True,
                                direction="maximize" if greater else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed), pruner=_pruner(optuna, pruner))
    study.set_user_attr("kiln", {"task": task, "data": str(data), "profile": profile, "init": str(init or ""),
                                 "metric": metric, "space": [dataclasses.asdict(d) for d in dimensions]})
    if resume:
        _retry_interrupted(optuna, study)
    deadline = time.time() + parse_duration(budget) if budget else None
    search = Search(task, str(data), name, folder, profile, str(init) if init else None, dimensions, metric,
                    tuple(overrides), deadline, command or f"kiln.tune({task!r}, ..., resume=True)")
    if jobs > 1:
        _run_workers(search, url, _remaining(study, trials), jobs, pruner, seed)
    else:
        _optimize(optuna, study, search, _remaining(study, trials))
    study = optuna.load_study(study_name=name, storage=_storage(optuna, url))
    _finish(study, search)
    return study


def _remaining(study: Any, trials: int) -> int:
    """How many of ``trials`` are still to run: every finished trial counts, whatever its end, but an
    interrupted one, which runs again."""
    return max(trials - sum(1 for t in study.get_trials(deepcopy=False)
                            if t.state.is_finished() and not _interrupted(t)), 0)


def _optimize(optuna: Any, study: Any, search: Search, count: int) -> None:
    """Run ``count`` trials (queued retries first), unless the deadline passes first or the space
    proves unusable (its first trials all fail)."""
    if count <= 0:
        return

    def stop_when_hopeless(study: Any, trial: Any) -> None:
        states = [t.state for t in study.trials]
        failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL and not _interrupted(t)]
        if len(failed) >= FAILING_START and optuna.trial.TrialState.COMPLETE not in states \
                and optuna.trial.TrialState.PRUNED not in states:
            study.stop()

    timeout = max(search.deadline - time.time(), 0) if search.deadline else None
    study.optimize(search.objective, n_trials=count, timeout=timeout, catch=(TrialFailed,),
                   callbacks=[stop_when_hopeless])


def _finish(study: Any, search: Search) -> None:
    """The summary, ``best.yaml``, or the reason no trial finished."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    finished = [t for t in study.trials if t.state == states.COMPLETE]
    pruned = [t for t in study.trials if t.state == states.PRUNED]
    failed = [t for t in study.trials if t.state == states.FAIL and not _interrupted(t)]
    counted = len(finished) + len(pruned) + len(failed)
    log.info(f"{counted} trials: {len(finished)} finished, {len(pruned)} pruned, {len(failed)} failed")
    if not finished:
        reasons = [t.user_attrs.get("error") for t in failed if t.user_attrs.get("error")]
        raise KilnError("no trial finished" + (f"; every one failed, the last with: {reasons[-1]}" if reasons
                                                  else " (pruned or stopped by the budget)"), search.folder)
    best = study.best_trial
    path = write_best(search, best)
    log.info(f"best: trial {best.number} ({best.user_attrs.get('run')}), {search.metric} {best.value:.4f}; "
             f"{', '.join(f'{k}={_shown(v)}' for k, v in best.params.items())}\n  written to {path}: "
             f"kiln train {search.task} DATA --profile {path}" + (f" --init {search.init}" if search.init else ""))


def write_best(search: Search, best: Any) -> Path:
    """The best trial's settings as a profile YAML on the search's base profile."""
    import yaml

    from kiln.files import write_text_atomic
    from kiln.run import profile_for

    base = profile_for(search.task, search.profile, search.init)
    tree: dict[str, Any] = {"name": f"{search.name}-best", "base": base,
                            "description": f"kiln tune {search.name}: trial {best.number}, "
                                           f"{search.metric} {best.value:.4f}"}
    for key, value in {**_overrides(search.overrides), **best.params}.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = search.folder / BEST_FILE
    write_text_atomic(path, yaml.safe_dump(tree, sort_keys=False))
    return path


def _overrides(overrides: Sequence[str]) -> dict[str, Any]:
    from kiln.config import parse_override

    return {resolve_key(key): value for key, value in map(parse_override, overrides)}


def _metric(task: str, data: str | Path, profile: str | None, init: str | Path | None, metric: str,
            overrides: Sequence[str]) -> tuple[str, bool]:
    """The metric the search optimises and whether larger is better: the given one, else the task's main
    metric for this data (fitted on the training split, as a run would)."""
    from kiln.run import resolve_config
    from kiln.tasks import get_task

    config = resolve_config(task, profile, str(init) if init else None, {"train.metric": metric or None},
                            overrides).build()
    task_obj = get_task(task, config)
    metric = config.train.metric
    if not metric:  # the main metric can depend on the data (regression, imbalance): fit as a run would
        task_obj.fit(task_obj.read(task_obj.find_splits(data)["train"]))
        metric = task_obj.main_metric
    return metric, task_obj.greater_is_better(metric)


def _pruner(optuna: Any, name: str) -> Any:
    if name == "asha":  # successive halving: keep the top third at each rung of evaluations
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def _storage(optuna: Any, url: str) -> Any:
    # SQLite waits for a lock instead of failing when several trial processes write at once.
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def _study_exists(optuna: Any, url: str, name: str) -> bool:
    try:
        return any(s.study_name == name for s in optuna.get_all_study_summaries(_storage(optuna, url)))
    except Exception as err:  # an unreachable or malformed storage URL
        raise KilnError(f"cannot open the study storage {url}: {err}") from None


def _retry_interrupted(optuna: Any, study: Any) -> None:
    """Trials left running by a killed search: marked failed, and queued again with the same settings,
    so that they continue from their run's checkpoint."""
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    # A run another trial owns (finished, queued, or failed for its own reasons) is not taken again.
    claimed = {t.user_attrs.get("run") for t in trials if t.state != states.RUNNING and not _interrupted(t)}
    for trial in trials:
        run = trial.user_attrs.get("run", f"trial-{trial.number:03d}")
        if (trial.state == states.RUNNING or _interrupted(trial)) and run not in claimed:
            if trial.state == states.RUNNING:  # killed (SIGKILL): optuna never heard of its end
                study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
                study._storage.set_trial_state_values(trial._trial_id, states.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"run": run})
            claimed.add(run)
            log.info(f"trial {trial.number} ({run}) was running when the search stopped: it continues")


def _interrupted(trial: Any) -> bool:
    """A trial stopped by Ctrl-C or SIGTERM at a checkpoint (recorded as failed, retried on --resume)."""
    return trial.state.name == "FAIL" and bool(trial.user_attrs.get("interrupted"))


def _run_workers(search: Search, url: str, count: int, jobs: int, pruner: str, seed: int) -> None:
    """``jobs`` processes sharing the study, each with its share of the ``count`` trials (a fixed share:
    counting the study's trials as they end would let processes finishing together overshoot) and of
    the cores."""
    cores = max(1, (os.cpu_count() or 1) // jobs)
    spec = {"search": {**dataclasses.asdict(search), "folder": str(search.folder)}, "url": url, "pruner": pruner}
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "KILN_TUNE_THREADS": str(cores)}
    shares = [count // jobs + (1 if i < count % jobs else 0) for i in range(jobs)]
    workers = [subprocess.Popen([sys.executable, "-m", "kiln.tuning",
                                 json.dumps({**spec, "trials": share, "seed": seed + i})], env=env)
               for i, share in enumerate(shares) if share]
    codes = [worker.wait() for worker in workers]
    if any(codes):
        log.warning(f"{sum(1 for c in codes if c)} of {len(workers)} trial processes ended with an error")


def _worker(spec: dict) -> None:
    """One trial process of a ``--jobs`` search."""
    import torch

    optuna = _optuna()
    torch.set_num_threads(int(os.environ.get("KILN_TUNE_THREADS", "1")))
    fields = spec["search"]
    search = Search(**{**fields, "folder": Path(fields["folder"]), "overrides": tuple(fields["overrides"]),
                       "space": [Dimension(d["key"], d["kind"], tuple(d["values"])) for d in fields["space"]]})
    study = optuna.load_study(study_name=search.name, storage=_storage(optuna, spec["url"]),
                              sampler=optuna.samplers.TPESampler(seed=spec["seed"]),
                              pruner=_pruner(optuna, spec["pruner"]))
    _optimize(optuna, study, search, spec["trials"])


def study_section(folder: Path, plots: bool = False) -> Any:
    """``kiln report``'s section of a search: its trials (state, value, settings, run) and, with
    ``plots``, the optimisation history, the parameters' importances and the parallel coordinates."""
    from kiln.html import Section, Table

    optuna = _optuna()
    url = f"sqlite:///{(folder / STUDY_FILE).resolve()}"
    study = optuna.load_study(study_name=folder.name, storage=_storage(optuna, url))
    facts = study.user_attrs.get("kiln", {})
    keys = list(dict.fromkeys(k for t in study.trials for k in t.params))
    rows = [[t.number, t.state.name.lower(), t.value, *(t.params.get(k) for k in keys), t.user_attrs.get("run"),
             t.user_attrs.get("error") or (f"stopped at step {t.user_attrs['stopped']['step']} "
                                          f"({t.user_attrs['stopped']['why']})" if t.user_attrs.get("stopped") else "")]
            for t in study.trials]
    section = Section(f"Search: {folder.name} ({facts.get('task', '')}, {facts.get('metric', '')})",
                      tables=[Table("Trials", ["trial", "state", facts.get("metric", "value"), *keys, "run", "note"],
                                    rows)])
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if finished:
        best = study.best_trial
        metric = facts.get("metric", "value")
        section.notes.append(f"Best: trial {best.number} ({best.user_attrs.get('run')}), {metric} {best.value:.4f}; "
                             f"its settings are in {folder / BEST_FILE}.")
    if plots and finished:
        section.plots += _study_plots(optuna, study, len(finished))
    return section


def _study_plots(optuna: Any, study: Any, finished: int) -> list:
    """optuna's own matplotlib figures, as kiln's page plots."""
    import io
    import warnings

    import matplotlib

    matplotlib.use("Agg")  # optuna draws with pyplot; no window, as kiln's own figures
    import matplotlib.pyplot as plt

    from kiln.html import Plot

    figures = [("history", "Optimisation history", optuna.visualization.matplotlib.plot_optimization_history),
               ("coordinates", "Parallel coordinates", optuna.visualization.matplotlib.plot_parallel_coordinate)]
    if finished >= 2 and len(study.best_params) >= 1:
        figures.insert(1, ("importances", "Parameter importances",
                           optuna.visualization.matplotlib.plot_param_importances))
    made = []
    for name, title, draw in figures:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            axes = draw(study)
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        made.append(Plot(f"search-{name}", title, buffer.getvalue()))
    return made


if __name__ == "__main__":
    from kiln.log import install_default_handler

    install_default_handler()
    _worker(json.loads(sys.argv[1]))
