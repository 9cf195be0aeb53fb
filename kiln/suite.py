"""Benchmark suites: one start fine-tuned and scored on every task of a suite, as one command.

A suite is data (``kiln/suites/NAME.yaml``, or a YAML path): its tasks, each a data folder with the
kiln task, columns, the metric that picks the best checkpoint and the scores to report, and named
recipes (settings for every task, plus settings for the large sets). :func:`run_suite` trains each
task into ``OUTPUT_DIR/TASK`` (an ordinary kiln run), records every score and time in
``OUTPUT_DIR/results.json`` and lays the table out as cramming reports GLUE. A task already in
``results.json`` is not trained again; one that was stopped resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

log = logging.getLogger(__name__)
SUITES = Path(__file__).parent / "suites"
RESULTS = "results.json"


@dataclass
class SuiteTask:
    """One task of a suite."""

    name: str
    folder: str
    task: str
    metric: str
    report: list[str]
    columns: str = ""
    large: bool = False


@dataclass
class Suite:
    """A suite's tasks and recipes, as its YAML declares them."""

    name: str
    tasks: dict[str, SuiteTask]
    default_tasks: list[str]
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def settings(self, recipe: str, task: SuiteTask) -> dict[str, Any]:
        """The recipe's settings for ``task`` (its large-set settings on top for a large set)."""
        if recipe not in self.recipes:
            raise KilnError(f"suite '{self.name}' has no recipe '{recipe}' (it has {', '.join(self.recipes)})")
        chosen = self.recipes[recipe]
        return {**chosen.get("settings", {}), **(chosen.get("large", {}) if task.large else {})}

    def select(self, names: str | None) -> list[SuiteTask]:
        """The tasks ``--tasks`` names (comma-separated; default: the suite's default set), in suite order."""
        wanted = [n.strip().lower() for n in names.split(",") if n.strip()] if names else self.default_tasks
        unknown = [n for n in wanted if n not in self.tasks]
        if unknown:
            raise KilnError(f"suite '{self.name}' has no task '{unknown[0]}' (it has {', '.join(self.tasks)})")
        return [task for name, task in self.tasks.items() if name in wanted]


def available() -> list[str]:
    """Names of the shipped suites."""
    return sorted(p.stem for p in SUITES.glob("*.yaml"))


def load_suite(name: str) -> Suite:
    """A shipped suite by name, or a suite YAML by path."""
    from kiln.config import load_yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else SUITES / f"{name}.yaml"
    if not path.is_file():
        raise KilnError(f"no suite '{name}' (shipped: {', '.join(available())}; or give a YAML path)")
    import yaml

    from kiln.tasks import TASKS

    try:
        tree = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise KilnError(f"invalid YAML: {getattr(err, 'problem', None) or err}", path,
                        mark.line + 1 if mark else None) from None
    try:
        tasks = {key: SuiteTask(name=key, **value) for key, value in tree["tasks"].items()}
        suite = Suite(tree.get("name", path.stem), tasks, list(tree.get("default_tasks") or tasks),
                      dict(tree.get("recipes") or {}))
        for name, recipe in suite.recipes.items():
            if not isinstance(recipe, dict) or not all(isinstance(recipe.get(k, {}), dict)
                                                      for k in ("settings", "large")):
                raise TypeError(f"recipe '{name}' must map 'settings' (and 'large') to settings")
        for task in tasks.values():
            if task.task not in TASKS or not task.report or not isinstance(task.report, list):
                raise TypeError(f"task '{task.name}' needs a kiln task ({', '.join(TASKS)}) and a 'report' list")
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise KilnError(f"not a suite: {err}", path) from None
    suite.select(",".join(suite.default_tasks))  # the defaults must exist
    return suite


def run_suite(suite: Suite, data: str | Path, output_dir: str | Path, *, tasks: str | None = None,
              init: str | None = None, profile: str | None = None, recipe: str = "sane",
              budget: str | None = None, overrides: list[str] | tuple[str, ...] = (), tune: int = 0) -> dict:
    """Fine-tune and score every selected task; returns (and writes) ``results.json``'s content.
    ``tune`` > 0: each small task's settings are first searched with that many ``kiln tune`` trials
    (within ``budget``, when given), and the task trains with the best."""
    from kiln.files import write_text_atomic
    from kiln.model_files import RUN_FILE
    from kiln.run import train
    from kiln.training.checkpoint import last_checkpoint

    data, output_dir = Path(data), Path(output_dir)
    selected = suite.select(tasks)
    _check_tasks(suite, selected, data, recipe)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / RESULTS
    local = init is not None and Path(init).expanduser().exists()
    start_key = {"init": str(Path(init).expanduser().resolve()) if local and init else init, "profile": profile,
                 "recipe": recipe, "budget": budget, "data": str(data.resolve()), "overrides": sorted(overrides)}
    results = _results_of(suite, results_path, start_key)
    for task in selected:
        run_dir = output_dir / task.name
        if task.name in results["tasks"]:
            if (run_dir / RUN_FILE).is_file() and (run_dir / "model" / "config.json").is_file():
                log.info(f"{task.name}: done before, not trained again ({run_dir})")
                continue
            log.warning(f"{task.name}: done before, but its run {run_dir} is gone; training it again")
            del results["tasks"][task.name]
        if run_dir.exists() and task.name not in results["started"]:
            raise KilnError("holds a run this suite did not start; kiln will not take it over or replace it: "
                            "use another --output-dir", run_dir)
        if task.name not in results["started"]:
            results["started"].append(task.name)
        write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
        resume = last_checkpoint(run_dir / "checkpoints") is not None and (run_dir / RUN_FILE).is_file()
        settings = {**suite.settings(recipe, task), "train.metric": task.metric}
        if budget:
            settings["train.budget"] = budget
        log.info(f"{task.name}: {task.task} on {data / task.folder}" + (" (resumed)" if resume else ""))
        began = time.perf_counter()
        if resume:
            run = train(task.task, data / task.folder, name=task.name, output_dir=output_dir, resume=True)
        elif tune and not task.large:
            best, tuned = _tuned(task, data, output_dir, init, profile, settings, overrides, tune)
            run = train(task.task, data / task.folder, name=task.name, init=init, profile=str(best),
                        output_dir=output_dir, overwrite=True, columns=task.columns or None)
        else:
            run = train(task.task, data / task.folder, name=task.name, init=init, profile=profile,
                             output_dir=output_dir, overwrite=True, columns=task.columns or None,
                             overrides=list(overrides), **settings)
        results["tasks"][task.name] = {"metrics": run.metrics, "score": 100 * run.metrics[task.report[0]],
                                       "reported": {k: 100 * run.metrics[k] for k in task.report},
                                       "seconds": round(time.perf_counter() - began, 1)}
        if tune and not task.large and not resume:
            results["tasks"][task.name]["tuned"] = tuned
        write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")  # a stop keeps what is done
    done = [entry["score"] for entry in results["tasks"].values()]  # every task the table shows
    results["average"] = sum(done) / len(done) if done else None
    write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
    return results


# What --tune searches around a suite recipe (which trains fixed-size batches): rate, epochs, batch
# size and warmup; the recipe's other settings apply to every trial.
TUNE_SPACE = {"optim.lr": {"log": [1e-5, 1e-4]}, "train.epochs": {"int": [2, 6]}, "train.batch_size": [8, 16, 32],
              "schedule.warmup_ratio": {"float": [0.0, 0.2]}}


def _tuned(task: SuiteTask, data: Path, output_dir: Path, init: str | None, profile: str | None,
           settings: dict[str, Any], overrides: list[str] | tuple[str, ...], trials: int) -> tuple[Path, dict]:
    """Search ``task``'s settings (``OUTPUT_DIR/TASK-search``, resumed when it exists) and return its
    best.yaml and the best settings."""
    from kiln.tuning import BEST_FILE, STUDY_FILE, tune

    name = f"{task.name}-search"
    # The recipe's other settings apply to every trial; those the space searches come from the trial.
    shared = [*(f"{key}={json.dumps(value)}" for key, value in settings.items()
                if key != "train.budget" and key not in TUNE_SPACE),
              *(["data.columns=" + task.columns] if task.columns else []), *overrides]
    log.info(f"{task.name}: searching {trials} trials ({output_dir / name})")
    study = tune(task.task, data / task.folder, name=name, init=init, profile=profile, output_dir=output_dir,
                 trials=trials, budget=settings.get("train.budget", ""), space=TUNE_SPACE, metric=task.metric,
                 resume=(output_dir / name / STUDY_FILE).is_file(), overrides=shared)
    return output_dir / name / BEST_FILE, study.best_params


def _check_tasks(suite: Suite, selected: list, data: Path, recipe: str) -> None:
    """Every folder, setting and metric, checked before the first task trains."""
    for task in selected:
        if not (data / task.folder).is_dir():
            raise KilnError(f"no {task.folder} folder for suite task '{task.name}'", data)
        suite.settings(recipe, task)
        unknown = [m for m in (task.metric, *task.report) if m not in _metric_names(task.task)]
        if unknown:
            raise KilnError(f"suite task '{task.name}': {task.task} reports no metric '{unknown[0]}' "
                            f"({', '.join(sorted(_metric_names(task.task)))})")


def _results_of(suite: Suite, results_path: Path, start_key: dict) -> dict:
    """``results.json`` as far as it got for this start (new when there is none), written back: from
    now on the start is fixed. Results of another start are refused."""
    from kiln.files import read_json, write_text_atomic

    results = read_json(results_path, required=("start", "tasks")) if results_path.is_file() else {}
    if results.get("start") not in (None, start_key):
        raise KilnError(f"holds results of another start, recipe or data ({results['start']}); "
                        "use another --output-dir", results_path)
    results = {"suite": suite.name, "start": start_key, "tasks": results.get("tasks", {}),
               "started": results.get("started", [])}
    write_text_atomic(results_path, json.dumps(results, indent=2) + "\n")
    return results


def _metric_names(kiln_task: str) -> set[str]:
    """Every metric a kiln task can report (classification's and regression's, for sequence tasks)."""
    from kiln.config import Config
    from kiln.tasks import get_task

    return {name for state in ({}, {"problem_type": "regression"})
            for name in get_task(kiln_task, Config(), state).metric_names()}


def table(suite: Suite, results: dict) -> str:
    """The results as cramming lays GLUE out: one column per task (its first reported score, with
    the second after a slash: MRPC's F1/accuracy, STS-B's Pearson/Spearman), then the average."""
    names = [name for name in suite.tasks if name in results["tasks"]]
    header = [*(suite.tasks[name].folder for name in names), "Avg"]  # the folder is the task's usual name
    cells = []
    for name in names:
        reported = list(results["tasks"][name]["reported"].values())
        cells.append("/".join(f"{value:.1f}" for value in reported))
    cells.append(f"{results['average']:.1f}" if results.get("average") is not None else "")
    widths = [max(len(h), len(c)) for h, c in zip(header, cells, strict=True)]
    line = lambda row: "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |"  # noqa: E731
    minutes = sum(results["tasks"][n]["seconds"] for n in names) / 60
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", line(cells),
                      f"({minutes:.0f} minutes of training and evaluation)"])
