"""``kiln report``: what one or more training runs did, read from their run directories.

Only the files a run writes are read (``run.json``, ``metrics.jsonl``, the weights' safetensors
header), never torch or the model, so a report takes a second and a run that is still training is
reported as it stands: ``metrics.jsonl`` grows one line at a time, and a half-written last line is
left out rather than refused.

``metrics.jsonl`` holds training-window records (``step``, ``epoch``, ``loss``, ``lr``,
``tokens_per_s``, ``elapsed``, perhaps ``grad_norm``), evaluation records (``"split":
"validation"`` with ``eval_*`` metrics) and test records (``"split": "test"``, ``test_*``).
Evaluation records carry no time; theirs is interpolated from the training records around their step.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.html import Plot, Section, Table
from kiln.model_files import METRICS_FILE, RUN_FILE
from kiln.tasks.base import LOWER_IS_BETTER

# Training-window values worth a curve, in this order (loss gets the validation loss beside it).
TRAIN_CURVES = {"loss": "loss", "lr": "learning rate", "tokens_per_s": "tokens / s", "grad_norm": "gradient norm"}


@dataclass
class RunLog:
    """One run directory's records."""

    path: Path
    name: str
    meta: dict
    train: list[dict] = field(default_factory=list)  # training windows, one per step
    evals: list[dict] = field(default_factory=list)  # validation, one per step
    tests: list[dict] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    parameters: int | None = None
    parameters_from: str = ""

    @property
    def finished(self) -> bool:
        """Whether training exported its model (``model/config.json``)."""
        return (self.path / "model" / "config.json").is_file()

    @property
    def config(self) -> dict:
        """The resolved configuration ``run.json`` records."""
        return self.meta.get("config") or {}

    def eval_metrics(self) -> list[str]:
        """Evaluation metric names (without ``eval_``), in the order they first appear."""
        names = dict.fromkeys(key[5:] for record in self.evals for key in record
                              if key.startswith("eval_") and key != "eval_n")
        return list(names)

    def elapsed_at(self, steps: Sequence[float]) -> list[float] | None:
        """Training seconds at ``steps``, interpolated between the training records around each."""
        timed = [(r["step"], r["elapsed"]) for r in self.train if _number(r.get("elapsed"))]
        if not timed:
            return None
        import numpy as np

        if timed[0][0] > 0:
            timed.insert(0, (0, 0.0))  # the trainer's clock starts at step 0 (a resumed run's continues)
        known_steps, seconds = zip(*timed, strict=True)
        return [float(v) for v in np.interp(steps, known_steps, seconds)]

    def greater_is_better(self, metric: str) -> bool:
        """The direction of ``metric``, as the run's task judged it when picking the best checkpoint."""
        task = self.task
        if task is not None:
            return bool(task.greater_is_better(metric))
        return metric not in LOWER_IS_BETTER

    def main_metric(self) -> str | None:
        """The metric that chose the best checkpoint (``train.metric``, else the task's)."""
        chosen = (self.config.get("train") or {}).get("metric")
        if chosen:
            return chosen
        task = self.task
        return getattr(task, "main_metric", None) if task is not None else None

    @functools.cached_property
    def task(self) -> Any:
        """The run's task object (for metric directions), or None for a run kiln cannot read back."""
        try:
            from kiln.config import config_from_dict
            from kiln.tasks import get_task

            return get_task(self.meta["task"], config_from_dict(self.config), self.meta.get("task_state"))
        except (KilnError, KeyError, TypeError, ValueError):  # a run of another kiln version
            return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_run(path: str | Path, name: str | None = None) -> RunLog:
    """Read a run directory; a directory that is not a kiln run is a :class:`KilnError`."""
    from kiln.files import read_json

    path = Path(path)
    if not path.is_dir():
        raise KilnError("no such run directory", path)
    if not (path / RUN_FILE).is_file():
        hint = (f"; it looks like a model directory, try {path.parent}" if (path.parent / RUN_FILE).is_file()
                else "; kiln report takes a run directory such as runs/NAME")
        raise KilnError(f"not a kiln run (no {RUN_FILE}){hint}", path)
    meta = read_json(path / RUN_FILE, required=("task", "config"))
    if not isinstance(meta["config"], dict):
        raise KilnError("'config' must be an object", path / RUN_FILE)
    run = RunLog(path, name or path.name, meta)
    train = Thinned(TRAIN_POINTS)
    by_step: dict[str, dict[Any, dict]] = {"validation": {}, "test": {}}
    for record in read_metrics(path / METRICS_FILE, run.findings):
        split = record.get("split")
        if not isinstance(split, str | None) or not _number(record.get("step")):
            continue  # not one kiln writes
        if split is None and "loss" in record:
            train.add(record)
        elif split in by_step:
            by_step[split][record["step"]] = record  # a resumed run logs its last steps again: the later wins
    run.train = train.records()
    if train.factor > 1:
        run.findings.append(f"{path / METRICS_FILE}: {train.seen:,} training records; the curves show every "
                            f"{train.factor}th logged step (and the last)")
    run.evals = sorted(by_step["validation"].values(), key=lambda r: r["step"])
    run.tests = list(by_step["test"].values())
    run.parameters, run.parameters_from = stored_parameters(path, run.findings)
    return run


# Training records kept per run: a curve of more points shows nothing more, and a long run's
# metrics.jsonl (millions of lines) would otherwise take gigabytes as Python objects.
TRAIN_POINTS = 20_000


class Thinned:
    """Training records by step, at most about ``cap`` of them, read in one pass: past the cap only
    every ``factor``-th logged step is kept (``factor`` doubles each time), and always the last. A
    step logged twice (a resumed run logs its last steps again) keeps the later record."""

    def __init__(self, cap: int):
        self.cap, self.factor, self.seen = cap, 1, 0
        self.base: float | None = None  # the logging interval: the smallest gap between two steps
        self.kept: dict[float, dict] = {}
        self.last: dict | None = None

    def add(self, record: dict) -> None:
        step = record["step"]
        self.seen += 1
        if self.last is not None and step != self.last["step"]:
            gap = abs(step - self.last["step"])
            self.base = gap if self.base is None else min(self.base, gap)
        self.last = record
        if self._wanted(step):
            self.kept[step] = record
            if len(self.kept) > self.cap:
                self.factor *= 2
                self.kept = {s: r for s, r in self.kept.items() if self._wanted(s)}

    def _wanted(self, step: float) -> bool:
        return self.factor == 1 or not self.base or round(step / self.base) % self.factor == 0

    def records(self) -> list[dict]:
        """The kept records (and the last), by step."""
        kept = dict(self.kept)
        if self.last is not None:
            kept[self.last["step"]] = self.last
        return sorted(kept.values(), key=lambda r: r["step"])


def read_metrics(path: Path, findings: list[str]) -> Iterator[dict]:
    """The records of ``metrics.jsonl``, one line at a time; what is wrong with it goes to
    ``findings``. A half-written last line (the run is writing it) is left out and said so; a bad
    line elsewhere is left out and reported."""
    if not path.is_file():
        findings.append(f"{path}: no metrics yet")
        return
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if not raw.endswith(b"\n"):  # no newline after it yet: still being written
                    findings.append(f"{path}:{number}: last line incomplete (the run is writing it), left out")
                else:
                    findings.append(f"{path}:{number}: not a JSON record, left out")
                continue
            if isinstance(record, dict):
                yield record
            else:
                findings.append(f"{path}:{number}: not a JSON object, left out")


def stored_parameters(run_dir: Path, findings: list[str]) -> tuple[int | None, str]:
    """Parameters in the newest saved weights (``model/``, else the best or last checkpoint), counted
    from the safetensors header's shapes (tied weights are stored, and counted, once)."""
    from kiln.model_files import WEIGHTS_FILE, WEIGHTS_INDEX_FILE
    from kiln.training.checkpoint import saved_checkpoints

    # Headers only, never a checksum: a report reads a large (or still training) run in a second.
    candidates = [run_dir / "model", run_dir / "checkpoints" / "best", *saved_checkpoints(run_dir / "checkpoints")]
    for directory in candidates:
        if (directory / WEIGHTS_FILE).is_file():
            files = [directory / WEIGHTS_FILE]
        elif (directory / WEIGHTS_INDEX_FILE).is_file():
            try:
                shards = json.loads((directory / WEIGHTS_INDEX_FILE).read_text())["weight_map"].values()
            except (OSError, ValueError, KeyError, AttributeError):
                findings.append(f"{directory / WEIGHTS_INDEX_FILE}: unreadable, parameters not counted")
                continue
            files = [directory / shard for shard in sorted(set(shards))]
        else:
            continue
        try:
            return sum(safetensors_parameters(file) for file in files), str(directory.relative_to(run_dir))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
            findings.append(f"{directory}: weights unreadable, parameters not counted")
    return None, ""


def safetensors_parameters(path: Path) -> int:
    """The number of values in a safetensors file, from its header alone (8-byte length, JSON)."""
    with open(path, "rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        if length > 100_000_000:
            raise ValueError("not a safetensors header")
        header = json.loads(stream.read(length))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def resolved_config(run: RunLog) -> dict[str, Any]:
    """The run's configuration as dotted keys, with what ``config.yaml`` adds (task, data, init)."""
    meta = run.meta
    return {"task": meta.get("task"), "data": meta.get("data"), "init": meta.get("init"),
            "max_length": meta.get("max_length"), "precision": meta.get("precision"), **flatten(run.config)}


def duration(seconds: float | None) -> str:
    """``3m07s`` as training prints it; "–" when unknown."""
    from kiln.training.callbacks import duration as shown

    return "–" if seconds is None else shown(seconds)


def _value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return json.dumps(value)
    return "–" if value is None else str(value)


# -- the report --------------------------------------------------------------------------------
@dataclass
class Report:
    """Runs read for ``kiln report``."""

    runs: list[RunLog]
    studies: list[Path] = field(default_factory=list)  # kiln tune searches among the paths

    def summary_table(self) -> Table:
        """One row per run: what it is, how far it got, how long it took, its size."""
        rows = []
        for run in self.runs:
            last = run.train[-1] if run.train else {}
            wall = None
            if (run.path / "config.yaml").is_file() and (run.path / METRICS_FILE).is_file():
                wall = (run.path / METRICS_FILE).stat().st_mtime - (run.path / "config.yaml").stat().st_mtime
            rows.append([run.name, run.meta.get("task"), run.meta.get("profile"),
                         "finished" if run.finished else "no model/ yet",
                         last.get("step"), last.get("epoch"), last.get("tokens"),
                         duration(last.get("elapsed")), duration(wall), run.parameters,
                         run.parameters_from or "–"])
        return Table("Runs", ["run", "task", "profile", "status", "steps", "epochs", "tokens", "training time",
                              "wall clock", "parameters", "counted in"], rows,
                     note=("no model/ yet: still training, or stopped before the end; "
                           if not all(run.finished for run in self.runs) else "")
                     + "training time: the trainer's own clock; wall clock: from config.yaml to the last metrics "
                       "record, evaluations (and a resumed run's pause) included")

    def metrics_table(self) -> Table:
        """Best and last value of every validation metric per run, with the test score."""
        rows = []
        for run in self.runs:
            main = run.main_metric()
            test = {k[5:]: v for record in run.tests for k, v in record.items() if k.startswith("test_")}
            test = test or dict(run.meta.get("test_metrics") or {})
            for metric in run.eval_metrics():
                series = [(r["step"], r[f"eval_{metric}"]) for r in run.evals if _number(r.get(f"eval_{metric}"))]
                if not series:
                    continue
                pick = max if run.greater_is_better(metric) else min
                top = pick(series, key=lambda item: item[1])
                rows.append([run.name, f"{metric} (main)" if metric == main else metric, top[1], top[0],
                             series[-1][1], series[-1][0], test.get(metric)])
            finite = [r for r in run.train if _number(r.get("loss"))]  # a diverged window logs NaN
            if finite:
                best = min(finite, key=lambda r: r["loss"])
                rows.append([run.name, "training loss", best["loss"], best["step"], run.train[-1].get("loss"),
                             run.train[-1]["step"], None])
        return Table("Best and last metrics", ["run", "metric", "best", "at step", "last", "at step", "test"], rows,
                     note="validation metrics (best by each metric's own direction); test: the exported model "
                          "on the labelled test split")

    def config_tables(self) -> list[Table]:
        """The differences between the runs' configurations, then each one in full."""
        configs = {run.name: resolved_config(run) for run in self.runs}
        tables = [Table(f"Configuration of {name}", ["setting", "value"],
                        [[key, _value(value)] for key, value in config.items()], collapsed=True, terminal=False)
                  for name, config in configs.items()]
        if len(configs) > 1:
            keys = list(dict.fromkeys(key for config in configs.values() for key in config))
            differ = [key for key in keys if len({json.dumps(c.get(key), sort_keys=True, default=str)
                                                  for c in configs.values()}) > 1]
            tables.insert(0, Table("Configuration differences", ["setting", *configs],
                                   [[key, *(_value(c.get(key)) for c in configs.values())] for key in differ],
                                   note="only the settings that differ between the runs" if differ
                                   else "the runs' configurations are identical"))
        return tables

    def sections(self, plots: bool = False) -> list[Section]:
        """The report's sections; ``plots`` draws the curves too (for the page and ``--png``)."""
        from kiln.tuning import study_section

        overview = Section("Runs", tables=[self.summary_table(), self.metrics_table()])
        sections = [*(study_section(folder, plots) for folder in self.studies), overview]
        if plots:
            sections.append(Section("Curves", plots=self.plots()))
        sections.append(Section("Configuration", tables=self.config_tables()))
        findings = [f for run in self.runs for f in run.findings]
        if findings:
            sections.append(Section("Findings", tables=[Table("Left out", ["what"], [[f] for f in findings])]))
        return sections

    # -- curves -----------------------------------------------------------------------------
    def curves(self) -> list[tuple[str, str]]:
        """``(name, title)`` of every curve some run has data for."""
        curves = [(key, title) for key, title in TRAIN_CURVES.items()
                  if any(_number(r.get(key)) for run in self.runs for r in run.train)
                  or (key == "loss" and any(run.evals for run in self.runs))]
        metrics = dict.fromkeys(m for run in self.runs for m in run.eval_metrics() if m != "loss")
        return curves + [(f"eval_{metric}", f"validation {metric}") for metric in metrics]

    def plots(self) -> list[Plot]:
        """One figure per curve, every run overlaid: against steps (left) and training time (right)."""
        return [self.plot(name, title) for name, title in self.curves()]

    def plot(self, name: str, title: str) -> Plot:
        """One curve's figure as PNG."""
        from kiln.html import png_bytes

        return Plot(name, title, png_bytes(self.figure(name, title)))

    def figure(self, name: str, title: str) -> Any:
        """The matplotlib Figure of one curve: every run, against steps and against training time."""
        from kiln.html import new_figure

        figure = new_figure(11, 3.6)
        by_step, by_time = figure.subplots(1, 2)
        longest = max((r["elapsed"] for run in self.runs for r in run.train if _number(r.get("elapsed"))), default=0)
        unit, scale = ("h", 3600) if longest > 7200 else ("min", 60) if longest > 120 else ("s", 1)
        for index, run in enumerate(self.runs):
            color = f"C{index % 10}"
            lines: list[tuple[list, list, list, str, str]] = []
            if name in TRAIN_CURVES:
                points = [r for r in run.train if _number(r.get(name))]
                lines.append(([r["step"] for r in points], [r[name] for r in points],
                              [r.get("elapsed") for r in points], f"{run.name} train" if name == "loss" else run.name,
                              "-"))
            metric = "eval_loss" if name == "loss" else name
            if metric.startswith("eval_"):
                points = [r for r in run.evals if _number(r.get(metric))]
                steps = [r["step"] for r in points]
                loss = name == "loss"
                lines.append((steps, [r[metric] for r in points], run.elapsed_at(steps) or [None] * len(steps),
                              f"{run.name} validation" if loss else run.name, "--" if loss else "-"))
            for steps, values, seconds, label, style in lines:
                if not steps:
                    continue
                marker = "o" if len(steps) <= 30 else None
                by_step.plot(steps, values, style, color=color, marker=marker, markersize=3, label=label)
                timed = [(float(s) / scale, v) for s, v in zip(seconds, values, strict=True) if _number(s)]
                if timed:
                    by_time.plot(*zip(*timed, strict=True), style, color=color, marker=marker, markersize=3,
                                 label=label)
        from matplotlib.ticker import MaxNLocator

        by_step.xaxis.set_major_locator(MaxNLocator(integer=True))
        for axis, xlabel in ((by_step, "step"), (by_time, f"training time ({unit})")):
            axis.set_xlabel(xlabel)
            axis.set_ylabel(title)
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize="small")
        if name == "lr":
            by_step.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            by_time.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        figure.suptitle(title)
        return figure


def report(paths: Sequence[str | Path]) -> Report:
    """Read the runs at ``paths``; runs with the same directory name are told apart by their parent. A
    ``kiln tune`` search stands for its trials' runs, and its study is reported too."""
    from kiln.tuning import STUDY_FILE

    dirs: list[Path] = []
    studies = []
    for path in map(Path, paths):
        if (path / STUDY_FILE).is_file():
            studies.append(path)
            dirs += sorted(p for p in path.iterdir() if (p / RUN_FILE).is_file())
        else:
            dirs.append(path)
    if not dirs:
        raise KilnError("the search has no trial runs yet", paths[0])
    return Report([load_run(path, name) for path, name in zip(dirs, run_names(dirs), strict=True)], studies)


def run_names(paths: Sequence[Path]) -> list[str]:
    """Short distinct names: the directory's, with as many parent folders as it takes to tell the
    runs apart (``a/runs/x``, ``b/runs/x``), and ``#2``, ``#3`` for a run given twice."""
    parts = [p.resolve().parts for p in paths]
    distinct = set(parts)

    def short(path: tuple[str, ...]) -> str:
        depth = 1
        while any(other != path and other[-depth:] == path[-depth:] for other in distinct):
            depth += 1
        return str(Path(*path[-depth:]))

    names = [short(p) for p in parts]
    return [name if name not in names[:i] else f"{name} #{names[:i].count(name) + 1}"
            for i, name in enumerate(names)]
