"""Inference precision: kiln predict in fp32 and bf16 against plain transformers in fp32.

Reproduce (from the repository root)::

    .venv/bin/python benchmarks/inference_precision.py --run runs/sst2     # a trained sequence run

Contenders, each in its own subprocess, on the same texts (SST-2 ``dev.tsv`` by default, repeated
``--repeat`` times so that the timing covers a few seconds):

* ``hf-fp32``: the reference, ``AutoModelForSequenceClassification`` + ``AutoTokenizer`` in fp32,
  batches of 32 in file order, padded to their longest member (what a plain loop or a pipeline does).
* ``kiln-fp32``: ``kiln.load(RUN, precision="fp32").predict(texts)``, kiln's default.
* ``kiln-bf16``: the same with ``precision="bf16"`` (fast where the CPU has native bf16, emulated and
  slow where it has not).

It prints examples/s and the ratio to the reference, and how far each kiln variant's scores are from
the reference's: the largest absolute difference of the top-label probability and the share of
labels that agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import run_worker, serve_worker

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"


def texts_of(path: str, repeat: int) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    column = lines[0].split("\t").index("sentence")
    return [line.split("\t")[column] for line in lines[1:]] * repeat


def run_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(spec["run"]) / "model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = texts_of(spec["data"], spec["repeat"])
    results = []
    with torch.inference_mode():  # warm-up, as kiln's: thread pools, first-call allocations
        model(**tokenizer(texts[:32], padding=True, truncation=True, return_tensors="pt"))
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            batch = tokenizer(texts[i:i + 32], padding=True, truncation=True, return_tensors="pt")
            probs = model(**batch).logits.float().softmax(-1)
            results += [(model.config.id2label[int(row.argmax())], float(row.max())) for row in probs]
    return {"seconds": time.perf_counter() - start, "results": results}


def run_kiln(spec: dict) -> dict:
    import kiln

    model = kiln.load(spec["run"], precision=spec["precision"])
    texts = texts_of(spec["data"], spec["repeat"])
    model.predict(texts[:64])  # warm-up: thread pools, first-call allocations
    start = time.perf_counter()
    results = [(r["label"], r["score"]) for r in model.predict(texts)]
    return {"seconds": time.perf_counter() - start, "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a trained kiln sequence run (runs/NAME); required")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a TSV with a 'sentence' column")
    parser.add_argument("--repeat", type=int, default=3, help="pass over the texts this many times")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve_worker(args.worker, {"hf-fp32": run_hf, "kiln-fp32": run_kiln, "kiln-bf16": run_kiln})
        return
    if not args.run:
        parser.error("--run is required")
    common = {"run": args.run, "data": args.data, "repeat": args.repeat}
    results = {name: run_worker(__file__, {**common, "contender": name, "precision": name.split("-")[1]})
               for name in ("hf-fp32", "kiln-fp32", "kiln-bf16")}
    reference = results["hf-fp32"]
    n = len(reference["results"])
    print(f"{'contender':<10} {'examples/s':>11} {'vs hf-fp32':>11} {'max |Δscore|':>13} {'labels agree':>13}")
    for name, result in results.items():
        pairs = list(zip(result["results"], reference["results"], strict=True))
        result["examples_per_s"] = n / result["seconds"]
        result["max_score_diff"] = max(abs(a[1] - b[1]) for a, b in pairs)
        result["label_agreement"] = sum(a[0] == b[0] for a, b in pairs) / n
        print(f"{name:<10} {result['examples_per_s']:>11.1f} "
              f"{result['examples_per_s'] / reference['examples_per_s']:>10.2f}x "
              f"{result['max_score_diff']:>13.2e} {result['label_agreement']:>12.2%}")
    if args.out:
        summary = {k: {m: v for m, v in r.items() if m != "results"} for k, r in results.items()}
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
