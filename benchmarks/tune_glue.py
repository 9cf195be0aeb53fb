"""What an hour of ``kiln tune`` buys on small GLUE sets: RTE and CoLA from all-MiniLM-L6-v2, the
suite's ``fast`` recipe against ``kiln suite glue --recipe fast --tune`` with a per-task budget, one
after the other on the same machine.

Reproduce (from the repository root, after ``make pretrained``; about 2 × (budget + 15 min))::

    .venv/bin/python benchmarks/tune_glue.py --budget 1h --out bench.json

Smoke test (a few minutes)::

    .venv/bin/python benchmarks/tune_glue.py --tasks rte --budget 3m

* ``fast``: ``kiln suite glue DATA --init MiniLM --recipe fast --tasks T``, the fixed recipe.
* ``tuned``: the same command with ``--tune 1000 --budget B``: each task's lr, epochs, batch size and
  warmup are searched by ``kiln tune`` (TPE, successive halving at each epoch's evaluation) within
  B, then the task trains once more with the best settings (``best.yaml``), and that run is scored.

Reported per task: the dev score of each (CoLA: MCC, RTE: accuracy, ×100), the search's trials
(finished, pruned) and the best trial's own score, which the retrained run should reproduce.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import run_worker, serve_worker

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "glue"
DEFAULT_INIT = REPO / "models" / "all-MiniLM-L6-v2"


def suite_worker(spec: dict) -> dict:
    import optuna

    from kiln.suite import load_suite, run_suite
    from kiln.tuning import STUDY_FILE

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        results = run_suite(load_suite("glue"), spec["data"], scratch, tasks=spec["task"], init=spec["init"],
                            recipe="fast", budget=spec.get("budget"), tune=spec.get("tune", 0))
        entry = results["tasks"][spec["task"]]
        out = {"score": entry["score"], "wall_seconds": time.monotonic() - started}
        study_db = Path(scratch) / f"{spec['task']}-search" / STUDY_FILE
        if study_db.is_file():
            study = optuna.load_study(study_name=f"{spec['task']}-search", storage=f"sqlite:///{study_db}")
            states = [t.state for t in study.trials]
            out.update(trials=len(states), finished=states.count(optuna.trial.TrialState.COMPLETE),
                       pruned=states.count(optuna.trial.TrialState.PRUNED), best_trial=100 * study.best_value,
                       best_settings=study.best_params)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the GLUE folder (RTE/, CoLA/ …)")
    parser.add_argument("--init", type=Path, default=DEFAULT_INIT, help="all-MiniLM-L6-v2 (make pretrained)")
    parser.add_argument("--tasks", default="rte,cola", help="suite task names (default: rte,cola)")
    parser.add_argument("--budget", default="1h", help="each task's search budget (default: 1h)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker(args.worker, {"fast": suite_worker, "tuned": suite_worker})
        return
    results: dict[str, dict] = {}
    for task in args.tasks.split(","):
        spec = {"data": str(args.data), "init": str(args.init), "task": task}
        results[task] = {"fast": run_worker(__file__, {**spec, "contender": "fast", "label": f"{task} fast"}),
                         "tuned": run_worker(__file__, {**spec, "contender": "tuned", "label": f"{task} tuned",
                                                        "budget": args.budget, "tune": 1000})}
        if args.out:  # a long benchmark keeps what it has
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nGLUE dev from all-MiniLM-L6-v2: the fast recipe against a {args.budget} search per task")
    for task, pair in results.items():
        fast, tuned = pair["fast"], pair["tuned"]
        print(f"  {task:5s} fast {fast['score']:.1f} ({fast['wall_seconds']:.0f} s)  tuned {tuned['score']:.1f} "
              f"(best trial {tuned.get('best_trial', float('nan')):.1f}; {tuned.get('trials', 0)} trials, "
              f"{tuned.get('finished', 0)} finished, {tuned.get('pruned', 0)} pruned; "
              f"{tuned['wall_seconds']:.0f} s)  gain {tuned['score'] - fast['score']:+.1f}")


if __name__ == "__main__":
    main()
