"""kiln vs sentence-transformers: STS-B from all-MiniLM-L6-v2, untouched and fine-tuned.

Reproduce (from the repository root, after ``make pretrained``; a few minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/embedding_stsb.py --out bench.json

Smoke test (seconds)::

    .venv/bin/python benchmarks/embedding_stsb.py --limit 200 --epochs 0.2

Contenders, each in its own subprocess (fresh thread pools and memory; results come back as JSON).
The metric is the Spearman correlation of the two sentences' cosine similarity with the gold score on
STS-B dev (1,500 pairs), computed by each library's own code path:

* ``kiln (untouched)``: ``kiln train embedding`` from MiniLM at learning rate 0 for one step, so the
  weights stay as released; the figure is kiln's own evaluation of them.
* ``sentence-transformers (untouched)``: ``SentenceTransformer(MiniLM).encode`` on dev, cosine, scipy's
  Spearman.
* ``kiln``: ``kiln train embedding STS-B --init MiniLM --epochs E``, kiln's pretrained-start recipe
  (1,024-token batches, lr 5e-5, linear schedule, 6 % warmup), cosine-similarity loss on the scores
  scaled to [0, 1]; the best checkpoint by dev Spearman.
* ``sentence-transformers``: ``SentenceTransformerTrainer`` with ``CosineSimilarityLoss`` on the same
  data (scores / 5), its STS-B example's settings (batch 16, lr 2e-5, 10 % warmup) and the same epochs,
  evaluated after training. bf16 where kiln's ``auto`` precision picks it.

Training seconds: kiln's ``elapsed`` of its last step line; sentence-transformers' ``train_runtime``.
Goal: fine-tuning beats the untouched model, and kiln matches sentence-transformers' Spearman.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import last_train_log, run_worker, serve_worker

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "glue" / "STS-B"
DEFAULT_INIT = REPO / "models" / "all-MiniLM-L6-v2"


def read_pairs(path: Path, limit: int | None = None) -> list[tuple[str, str, float]]:
    """``(sentence1, sentence2, score)`` rows of a GLUE STS-B file (tabs only, no quoting)."""
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["sentence1"], r["sentence2"], float(r["score"])) for r in rows[:limit]]


def small_copy(data: Path, limit: int | None, scratch: Path) -> Path:
    """``data`` itself, or its first ``limit`` rows of train and dev in ``scratch`` (smoke tests)."""
    if not limit:
        return data
    folder = scratch / "sts-small"
    folder.mkdir()
    for name in ("train", "dev"):
        rows = read_pairs(data / f"{name}.tsv", limit)
        lines = ["sentence1\tsentence2\tscore", *(f"{a}\t{b}\t{s}" for a, b, s in rows)]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def spearman(similarities: list[float], scores: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(similarities, scores).statistic)


def kiln_worker(spec: dict) -> dict:
    import kiln

    options = {"max_steps": 1, "lr": 0.0} if spec["untouched"] else {"epochs": spec["epochs"]}
    with tempfile.TemporaryDirectory() as scratch:
        run = kiln.train("embedding", spec["data"], name="sts", init=spec["init"], output_dir=scratch, **options)
        seconds = last_train_log(run.path)["elapsed"]
    return {"spearman": run.metrics["spearman"], "train_seconds": 0.0 if spec["untouched"] else seconds}


def st_worker(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments

    from kiln.training.device import resolve_precision

    model = SentenceTransformer(spec["init"], device="cpu")
    dev = read_pairs(Path(spec["data"]) / "dev.tsv")
    seconds = 0.0
    if not spec["untouched"]:
        train = read_pairs(Path(spec["data"]) / "train.tsv")
        dataset = Dataset.from_dict({"sentence1": [a for a, _, _ in train], "sentence2": [b for _, b, _ in train],
                                     "score": [s / 5 for _, _, s in train]})
        with tempfile.TemporaryDirectory() as scratch:
            args = SentenceTransformerTrainingArguments(
                output_dir=scratch, num_train_epochs=spec["epochs"], per_device_train_batch_size=16,
                learning_rate=2e-5, warmup_steps=0.1, save_strategy="no", report_to=[], use_cpu=True,
                bf16=resolve_precision("auto", torch.device("cpu")) == "bf16", seed=42)
            trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                                 loss=losses.CosineSimilarityLoss(model))
            seconds = trainer.train().metrics["train_runtime"]
    first = model.encode([a for a, _, _ in dev], convert_to_tensor=True)
    second = model.encode([b for _, b, _ in dev], convert_to_tensor=True)
    similarities = torch.nn.functional.cosine_similarity(first, second).tolist()
    return {"spearman": spearman(similarities, [s for _, _, s in dev]), "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GLUE STS-B directory")
    parser.add_argument("--init", type=Path, default=DEFAULT_INIT, help="all-MiniLM-L6-v2 (make pretrained)")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--limit", type=int, default=None, help="first N rows of train and dev (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker(args.worker, {"kiln": kiln_worker, "st": st_worker})
        return
    with tempfile.TemporaryDirectory() as scratch:
        data = small_copy(args.data, args.limit, Path(scratch))
        results = {}
        for contender, untouched, label in (("kiln", True, "kiln (untouched)"),
                                            ("st", True, "sentence-transformers (untouched)"),
                                            ("kiln", False, "kiln"), ("st", False, "sentence-transformers")):
            spec = {"contender": contender, "label": label, "untouched": untouched, "data": str(data),
                    "init": str(args.init), "epochs": args.epochs}
            results[label] = run_worker(__file__, spec)
    print(f"\nSTS-B dev Spearman from all-MiniLM-L6-v2 ({args.epochs:g} epochs when trained)")
    for label, result in results.items():
        print(f"  {label:36s} {result['spearman']:.4f}   train {result['train_seconds']:7.1f} s")
    kiln_run, st_run = results["kiln"], results["sentence-transformers"]
    ratio = st_run["train_seconds"] / kiln_run["train_seconds"]
    print(f"  kiln - sentence-transformers: {kiln_run['spearman'] - st_run['spearman']:+.4f} Spearman; "
          f"training time ratio (sentence-transformers / kiln) {ratio:.2f}x")
    print(f"  fine-tuning lifts kiln from {results['kiln (untouched)']['spearman']:.4f} to {kiln_run['spearman']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
