"""kiln tune against HF Trainer's ``hyperparameter_search`` (optuna backend): RTE from all-MiniLM-L6-v2,
the same space, the same wall-clock budget, one after the other on the same machine.

Reproduce (from the repository root, after ``make pretrained``; twice the budget, plus loading)::

    .venv/bin/python benchmarks/tune_vs_hf.py --budget 20m --out bench.json

Smoke test (a few minutes)::

    .venv/bin/python benchmarks/tune_vs_hf.py --budget 90s --limit 200

Both search ``lr`` log-uniform in [1e-5, 1e-4], epochs in 2..5, batch size in {8, 16, 32} and
warmup ratio in [0, 0.2] with optuna's TPE sampler (seed 0) and its successive-halving pruner,
evaluating dev accuracy after every epoch, in bf16 where kiln's ``auto`` precision picks it:

* ``kiln``: ``kiln.tune("sentence-pair", RTE, init=MiniLM, budget=B)``: trials are kiln runs; a trial
  running at the deadline stops there.
* ``hf``: ``Trainer.hyperparameter_search(backend="optuna", timeout=B)`` with ``model_init`` from
  MiniLM, dynamic padding (``DataCollatorWithPadding``) and ``eval_strategy="epoch"``; optuna's
  timeout lets the trial running at the deadline finish, so its wall time is reported too.

Reported: trials finished and pruned within the budget, the best dev accuracy, and the wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import run_worker, serve_worker

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "glue" / "RTE"
DEFAULT_INIT = REPO / "models" / "all-MiniLM-L6-v2"
SPACE = {"optim.lr": {"log": [1e-5, 1e-4]}, "train.epochs": {"int": [2, 5]}, "train.batch_size": [8, 16, 32],
         "schedule.warmup_ratio": {"float": [0.0, 0.2]}}


def read_rte(path: Path, limit: int | None) -> list[tuple[str, str, str]]:
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["sentence1"], r["sentence2"], r["label"]) for r in rows[:limit]]


def small_copy(data: Path, limit: int | None, scratch: Path) -> Path:
    if not limit:
        return data
    folder = scratch / "rte-small"
    folder.mkdir()
    for name in ("train", "dev"):
        rows = read_rte(data / f"{name}.tsv", limit)
        lines = ["sentence1\tsentence2\tlabel", *("\t".join(row) for row in rows)]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def kiln_worker(spec: dict) -> dict:
    import optuna

    import kiln

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            study = kiln.tune("sentence-pair", spec["data"], name="rte", init=spec["init"], output_dir=scratch,
                              trials=1000, budget=spec["budget"], space=SPACE, metric="accuracy", seed=0)
        except kiln.errors.KilnError as err:  # no trial finished within the budget
            return {"finished": 0, "pruned": 0, "best": None, "wall_seconds": time.monotonic() - started,
                    "note": err.message}
    states = [t.state for t in study.trials]
    return {"finished": states.count(optuna.trial.TrialState.COMPLETE),
            "pruned": states.count(optuna.trial.TrialState.PRUNED), "best": study.best_value,
            "wall_seconds": time.monotonic() - started}


def hf_worker(spec: dict) -> dict:
    import numpy as np
    import optuna
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from kiln.config import parse_duration
    from kiln.training.device import resolve_precision

    started = time.monotonic()
    data, init = Path(spec["data"]), spec["init"]
    tokenizer = AutoTokenizer.from_pretrained(init)
    labels = ["entailment", "not_entailment"]

    def encoded(name: str) -> list[dict]:
        rows = read_rte(data / f"{name}.tsv", None)
        enc = tokenizer([a for a, _, _ in rows], [b for _, b, _ in rows], truncation=True, max_length=512)
        return [{"input_ids": ids, "attention_mask": mask, **({"token_type_ids": enc["token_type_ids"][i]}
                                                              if "token_type_ids" in enc else {}),
                 "labels": labels.index(rows[i][2])}
                for i, (ids, mask) in enumerate(zip(enc["input_ids"], enc["attention_mask"], strict=True))]

    train, dev = encoded("train"), encoded("dev")

    def model_init(trial=None):
        return AutoModelForSequenceClassification.from_pretrained(init, num_labels=2)

    def hp_space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-4, log=True),
                "num_train_epochs": trial.suggest_int("num_train_epochs", 2, 5),
                "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [8, 16, 32]),
                # transformers 5 reads a warmup_steps below 1 as a fraction of the steps (it has no warmup_ratio).
                "warmup_steps": trial.suggest_float("warmup_steps", 0.0, 0.2)}

    def accuracy(prediction) -> dict:
        return {"accuracy": float(np.mean(np.argmax(prediction.predictions, -1) == prediction.label_ids))}

    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, eval_strategy="epoch", save_strategy="no", report_to=[],
                                 use_cpu=True, bf16=resolve_precision("auto", torch.device("cpu")) == "bf16",
                                 logging_strategy="no", disable_tqdm=True, seed=42)
        trainer = Trainer(model_init=model_init, args=args, train_dataset=train, eval_dataset=dev,
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
        best = trainer.hyperparameter_search(
            direction="maximize", backend="optuna", hp_space=hp_space, n_trials=1000,
            timeout=parse_duration(spec["budget"]), compute_objective=lambda metrics: metrics["eval_accuracy"],
            sampler=optuna.samplers.TPESampler(seed=0), storage=f"sqlite:///{scratch}/hf.db", study_name="hf",
            pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
        states = [t.state for t in optuna.load_study(study_name="hf", storage=f"sqlite:///{scratch}/hf.db").trials]
    return {"best": best.objective, "finished": states.count(optuna.trial.TrialState.COMPLETE),
            "pruned": states.count(optuna.trial.TrialState.PRUNED), "wall_seconds": time.monotonic() - started,
            "best_settings": best.hyperparameters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GLUE RTE directory")
    parser.add_argument("--init", type=Path, default=DEFAULT_INIT, help="all-MiniLM-L6-v2 (make pretrained)")
    parser.add_argument("--budget", default="20m", help="wall clock of each search")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of train and dev (smoke test)")
    parser.add_argument("--contenders", default="kiln,hf", help="which searches to run (default: kiln,hf)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker(args.worker, {"kiln": kiln_worker, "hf": hf_worker})
        return
    with tempfile.TemporaryDirectory() as scratch:
        data = small_copy(args.data, args.limit, Path(scratch))
        results = {name: run_worker(__file__, {"contender": name, "data": str(data), "init": str(args.init),
                                               "budget": args.budget}) for name in args.contenders.split(",")}
    print(f"\nRTE dev accuracy, a {args.budget} search from all-MiniLM-L6-v2")
    for name, result in results.items():
        print(f"  {name:5s} best {result['best']}  finished {result.get('finished', '?')}  "
              f"pruned {result.get('pruned', '?')}  wall {result['wall_seconds']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
