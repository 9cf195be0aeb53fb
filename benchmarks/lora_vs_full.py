"""LoRA against full fine-tuning from all-MiniLM-L6-v2: SST-2 and CoNLL-2003, one after the other
on the same machine, each run in its own process.

Reproduce (from the repository root, after ``make pretrained``; about an hour on 2 cores)::

    .venv/bin/python benchmarks/lora_vs_full.py --out bench.json

Smoke test (a few minutes)::

    .venv/bin/python benchmarks/lora_vs_full.py --max-steps 20 --tasks sst2

Each task is trained twice with kiln's pretrained-start recipe (``_finetune``: 1,024-token batches,
linear schedule, 6 % warmup), in the precision ``auto`` picks:

* ``full``: every weight trains (lr 5e-5, the recipe's);
* ``lora``: ``--lora`` (rank 8 on query and value, alpha 16, the head whole; lr 5e-4, ``lora.lr``).

SST-2 trains one epoch, CoNLL-2003 three. Reported: the dev metric (accuracy; entity F1), the mean
optimizer-step time (the run's elapsed training time over its steps; one evaluation per epoch
included), the process's peak
resident memory, the best checkpoint's size on disk, and the parameters that train.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import last_train_log, run_worker, serve_worker

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DEFAULT_INIT = REPO / "models" / "all-MiniLM-L6-v2"
TASKS = {"sst2": ("sequence", DATA / "glue" / "SST-2", 1, "accuracy"),
         "conll": ("token", DATA / "conll2003", 3, "f1")}


def train_worker(spec: dict) -> dict:
    import kiln
    from kiln.models import count_parameters

    task, data, epochs, metric = TASKS[spec["task"]]
    settings = {"train.epochs": epochs, "train.eval_every": 0}
    if spec.get("max_steps"):
        settings["train.max_steps"] = spec["max_steps"]
    if spec["contender"] == "lora":
        settings["lora.r"] = 8
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        run = kiln.train(task, data, name="run", init=spec["init"], output_dir=scratch, **settings)
        last = last_train_log(run.path)
        best = run.path / "checkpoints" / "best"
        size = sum(f.stat().st_size for f in best.rglob("*") if f.is_file()) if best.is_dir() else None
        if size is None:  # keep_checkpoints off: the checkpoints are gone; what one held is the export's
            folder = run.path / ("adapter" if spec["contender"] == "lora" else "model")
            size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
        model = run.load(device="cpu").model
        total = count_parameters(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"metric": metric, "score": run.metrics[metric], "steps": last["step"],
            "seconds_per_step": last["elapsed"] / last["step"], "peak_rss_mib": round(peak),
            "checkpoint_mib": round(size / 2**20, 2), "parameters": total,
            "wall_seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, default=DEFAULT_INIT, help="all-MiniLM-L6-v2 (make pretrained)")
    parser.add_argument("--tasks", default="sst2,conll", help="sst2, conll or both (default)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop each run after N steps (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker(args.worker, {"full": train_worker, "lora": train_worker})
        return
    results: dict[str, dict] = {}
    for task in args.tasks.split(","):
        spec = {"task": task, "init": str(args.init), "max_steps": args.max_steps}
        results[task] = {name: run_worker(__file__, {**spec, "contender": name, "label": f"{task} {name}"})
                         for name in ("full", "lora")}
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\nLoRA (r=8) against full fine-tuning from all-MiniLM-L6-v2")
    for task, pair in results.items():
        full, lora = pair["full"], pair["lora"]
        for name, r in pair.items():
            print(f"  {task:5s} {name:4s} {r['metric']} {r['score']:.4f}  {r['seconds_per_step']:.3f} s/step  "
                  f"peak {r['peak_rss_mib']} MiB  checkpoint {r['checkpoint_mib']} MiB")
        print(f"  {task:5s} lora - full: {100 * (lora['score'] - full['score']):+.2f} points, step time "
              f"{lora['seconds_per_step'] / full['seconds_per_step']:.2f}x, memory "
              f"{lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}x, checkpoint "
              f"{lora['checkpoint_mib'] / full['checkpoint_mib']:.3f}x")


if __name__ == "__main__":
    main()
