"""kiln distill: a bert-mini student from a fine-tuned all-MiniLM-L6-v2 teacher, against the same
student trained from scratch on the labels alone, and the student's prediction speed against the
teacher's; SST-2 and CoNLL-2003, each contender in its own process, one after the other.

Reproduce (from the repository root, after ``make pretrained``)::

    kiln train sequence ../shared/data/glue/SST-2 -n sst2-minilm --init models/all-MiniLM-L6-v2 --epochs 1
    kiln train token ../shared/data/conll2003 -n ner-minilm --init models/all-MiniLM-L6-v2
    .venv/bin/python benchmarks/distill_vs_scratch.py --out bench.json

(a teacher that is not there is trained first, with those commands' settings). Smoke test::

    .venv/bin/python benchmarks/distill_vs_scratch.py --tasks sst2 --max-steps 30

Per task:

* ``scratch``: ``kiln train TASK DATA --profile bert-mini`` (5.3M parameters, its own tokenizer);
* ``distilled``: ``kiln distill TEACHER DATA --profile bert-mini`` with its defaults: the same recipe
  and tokenizer, the student started from a subset of the teacher's weights, and 4 perturbed copies
  of each training input labelled by the teacher (temperature 2, alpha 0.5; the teacher's targets
  are computed once and cached); ``--augment 0 --student-init random`` gives distillation on the
  training inputs alone from random weights;
* speed: ``kiln predict``'s path (``kiln.load(RUN)``, fp32, the default; one warm-up call, then the
  dev file read and predicted) for the teacher and the distilled student, in examples per second.

Goals: SST-2 dev accuracy ≥ 0.86 distilled (scratch: about 0.81) at ≥ 4x the teacher's examples/s;
CoNLL-2003 entity F1 ≥ 0.80 distilled (scratch: about 0.65).
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
DATA = REPO.parent / "shared" / "data"
DEFAULT_INIT = REPO / "models" / "all-MiniLM-L6-v2"
TASKS = {  # task, data, dev file, the teacher's run and epochs, the metric
    "sst2": ("sequence", DATA / "glue" / "SST-2", "dev.tsv", REPO / "runs" / "sst2-minilm", 1, "accuracy"),
    "conll": ("token", DATA / "conll2003", "valid.txt", REPO / "runs" / "ner-minilm", 3, "f1"),
}


def teacher_worker(spec: dict) -> dict:
    import kiln

    task, data, _, run, epochs, metric = TASKS[spec["task"]]
    trained = kiln.train(task, data, name=run.name, init=spec["init"], output_dir=run.parent, epochs=epochs)
    return {"score": trained.metrics[metric]}


def student_worker(spec: dict) -> dict:
    import kiln

    task, data, _, teacher, _, metric = TASKS[spec["task"]]
    settings = {"train.max_steps": spec["max_steps"]} if spec.get("max_steps") else {}
    if spec["contender"] == "distilled":
        settings.update({"distill.teacher": str(teacher), "distill.augment": spec["augment"],
                         "distill.student_init": spec["student_init"]})
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        run = kiln.train(task, data, name="student", profile="bert-mini", output_dir=scratch, **settings)
        speed = speed_of(run.path, spec["task"])
        teacher_score = json.loads((run.path / "run.json").read_text()).get("teacher", {}).get("metrics", {})
    return {"score": run.metrics[metric], "teacher_score": teacher_score.get(metric), **speed,
            "wall_seconds": time.monotonic() - started}


def speed_of(run: Path, name: str) -> dict:
    import kiln

    _, data, dev, *_ = TASKS[name]
    model = kiln.load(run)
    model.predict_dataset(model.read(data / dev, labelled=False))  # warm-up: threads, allocator
    started = time.perf_counter()
    dataset = model.read(data / dev, labelled=False)
    model.predict_dataset(dataset)
    seconds = time.perf_counter() - started
    return {"examples_per_s": len(dataset) / seconds, "parameters": model.num_parameters()}


def teacher_speed_worker(spec: dict) -> dict:
    return speed_of(TASKS[spec["task"]][3], spec["task"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, default=DEFAULT_INIT, help="all-MiniLM-L6-v2, for a teacher to train")
    parser.add_argument("--tasks", default="sst2,conll", help="sst2, conll or both (default)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop each student after N steps (smoke test)")
    parser.add_argument("--augment", type=int, default=4, help="perturbed copies per input (kiln distill's default)")
    parser.add_argument("--student-init", default="teacher", choices=("teacher", "random"),
                        help="the distilled student's start (kiln distill's default: teacher)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker(args.worker, {"teacher": teacher_worker, "scratch": student_worker,
                                   "distilled": student_worker, "teacher-speed": teacher_speed_worker})
        return
    results: dict[str, dict] = {}
    for task in args.tasks.split(","):
        spec = {"task": task, "init": str(args.init), "max_steps": args.max_steps, "augment": args.augment,
                "student_init": args.student_init}
        if not (TASKS[task][3] / "model" / "config.json").is_file():
            run_worker(__file__, {**spec, "contender": "teacher", "label": f"{task} teacher (training it)"})
        results[task] = {name: run_worker(__file__, {**spec, "contender": name, "label": f"{task} {name}"})
                         for name in ("teacher-speed", "scratch", "distilled")}
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\nbert-mini students: from scratch and distilled from all-MiniLM-L6-v2 teachers")
    for task, r in results.items():
        metric = TASKS[task][5]
        ratio = r["distilled"]["examples_per_s"] / r["teacher-speed"]["examples_per_s"]
        print(f"  {task:5s} {metric}: teacher {r['distilled']['teacher_score']:.4f}, scratch "
              f"{r['scratch']['score']:.4f}, distilled {r['distilled']['score']:.4f}; predict: teacher "
              f"{r['teacher-speed']['examples_per_s']:.1f}/s, student {r['distilled']['examples_per_s']:.1f}/s "
              f"({ratio:.2f}x)")


if __name__ == "__main__":
    main()
