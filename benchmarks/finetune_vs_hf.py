"""kiln vs HF ``Trainer``: one epoch of SST-2 from scratch with the bert-mini architecture.

Reproduce (from the repository root; the full run takes a long time on CPU)::

    .venv/bin/python benchmarks/finetune_vs_hf.py --out bench.json

Smoke test (seconds)::

    .venv/bin/python benchmarks/finetune_vs_hf.py --limit 500 --padded-max-steps 5

Contenders, each in its own subprocess (fresh thread pools and memory; results come back as JSON):

* ``kiln``: ``kiln.train("sequence", DATA, profile="bert-mini", epochs=1)``, its own recipe
  (token-budget length-bucketed batches, lr and warmup from the profile). Examples/s is train
  examples over training seconds (``elapsed`` of the last step line in ``metrics.jsonl``); wall
  time also covers tokenizer training, encoding, evaluation and checkpoints.
* ``hf-padded`` (set-up a, the ``run_glue`` defaults): the same architecture and kiln's trained
  tokenizer, inputs padded to 128 tokens, batch 32, lr 1e-4, linear schedule, no warmup, HF
  defaults otherwise (weight decay 0). ``--padded-max-steps N`` caps it at N steps (throughput
  only: no dev accuracy); ``0`` runs the full epoch.
* ``hf-grouped`` (set-up b): as (a) but unpadded inputs, ``DataCollatorWithPadding`` and
  ``train_sampling_strategy="group_by_length"`` (transformers 5's name for ``group_by_length``).
* ``hf-grouped-best`` (set-up c): (b) with HF's fastest switches, ``torch_compile=True`` and
  ``optim="adamw_torch_fused"``; its compilation counts in its training time, as kiln's would.

HF examples/s is examples processed over ``train_runtime`` of ``trainer.train()``. Both HF set-ups
use bf16 only where kiln's ``auto`` precision picks it (never on CPUs without AMX/AVX512-BF16).
Dev accuracy is the argmax of ``trainer.predict`` logits against ``dev.tsv`` labels.
Targets: kiln ≥5× the examples/s of (a) and ≥2× of (b) and (c), at equal or better dev accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import run_worker, serve_worker

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue" / "SST-2"
HF_BATCH = 32
HF_LR = 1e-4
TARGETS = {"hf-padded": 5.0, "hf-grouped": 2.0, "hf-grouped-best": 2.0}
SETUPS = {
    "hf-padded": "HF Trainer (a) run_glue: pad to 128",
    "hf-grouped": "HF Trainer (b) group_by_length",
    "hf-grouped-best": "HF Trainer (c) (b) + compile + fused AdamW",
}


def read_tsv(path: Path, limit: int | None = None) -> tuple[list[str], list[int]]:
    """``sentence<TAB>label`` rows after a header line, split on tabs only (no CSV quoting)."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        text_col, label_col = header.index("sentence"), header.index("label")
        for line in handle:
            if limit is not None and len(texts) >= limit:
                break
            fields = line.rstrip("\n").split("\t")
            if len(fields) > max(text_col, label_col):
                texts.append(fields[text_col])
                labels.append(int(fields[label_col]))
    return texts, labels


def prepare_data(data: Path, limit: int | None, workdir: Path) -> Path:
    """The data directory to train on: ``data`` itself, or a copy with the first ``limit`` train rows."""
    if limit is None:
        return data
    subset = workdir / "data"
    subset.mkdir()
    with open(data / "train.tsv", encoding="utf-8") as src:
        lines = [next(src) for _ in range(limit + 1)]
    (subset / "train.tsv").write_text("".join(lines), encoding="utf-8")
    (subset / "dev.tsv").write_text((data / "dev.tsv").read_text(encoding="utf-8"), encoding="utf-8")
    return subset


def count_params(weights: Path) -> int:
    """Parameters in a safetensors file, read from its header."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


# -- contenders (each runs in a worker subprocess) ----------------------------------------------
def run_kiln(spec: dict) -> dict:
    import torch  # noqa: F401  (imported before timing, as in the HF workers)
    import transformers  # noqa: F401

    import kiln
    import kiln.run
    import kiln.training.trainer

    n_train = len(read_tsv(Path(spec["data"]) / "train.tsv")[0])
    overrides = {k: v for k, v in (("batch_tokens", spec["batch_tokens"]), ("lr", spec["lr"]))
                 if v is not None}
    start = time.perf_counter()
    run = kiln.train("sequence", spec["data"], name="kiln-sst2", profile="bert-mini",
                     output_dir=spec["workdir"], epochs=1, overwrite=True, **overrides)
    wall = time.perf_counter() - start
    steps = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "elapsed" in r and "split" not in r]
    train_seconds = steps[-1]["elapsed"]
    return {
        "contender": "kiln", "label": "kiln (bert-mini profile)", "examples": n_train,
        "steps": steps[-1]["step"], "train_seconds": train_seconds, "wall_seconds": wall,
        "examples_per_s": n_train / train_seconds, "dev_accuracy": run.metrics["accuracy"],
        "capped": False, "tokenizer": str(run.model_dir), "lr": run.config.optim.lr,
        "batch_tokens": run.config.train.batch_tokens,
        "params": count_params(run.model_dir / "model.safetensors"),
        "vocab_size": json.loads((run.model_dir / "config.json").read_text())["vocab_size"],
    }


def run_hf(spec: dict) -> dict:
    """One HF ``Trainer`` set-up: ``hf-padded`` (a) or ``hf-grouped`` (b)."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from kiln.training.device import resolve_precision

    padded = spec["contender"] == "hf-padded"
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    encode = ({"padding": "max_length", "max_length": 128, "truncation": True} if padded
              else {"truncation": True, "max_length": 512})

    def dataset(split: str) -> list[dict]:
        texts, labels = read_tsv(Path(spec["data"]) / f"{split}.tsv")
        enc = tok(texts, **encode)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(len(texts))]

    train_set, dev_set = dataset("train"), dataset("dev")
    cap = spec["padded_max_steps"] if padded else 0
    max_steps = cap if 0 < cap < math.ceil(len(train_set) / HF_BATCH) else -1  # never past one epoch
    set_seed(42)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, num_labels=2, pad_token_id=tok.pad_token_id))
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / spec["contender"]), per_device_train_batch_size=HF_BATCH,
        learning_rate=HF_LR, num_train_epochs=1, max_steps=max_steps, seed=42,
        bf16=resolve_precision("auto", torch.device("cpu")) == "bf16", use_cpu=True,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10**9,
        dataloader_num_workers=0, disable_tqdm=True,
        train_sampling_strategy="random" if padded else "group_by_length",
        torch_compile=spec["contender"] == "hf-grouped-best",
        optim="adamw_torch_fused" if spec["contender"] == "hf-grouped-best" else "adamw_torch",
    )
    collator = default_data_collator if padded else DataCollatorWithPadding(tok)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                      processing_class=tok)
    out = trainer.train()
    train_seconds = out.metrics["train_runtime"]
    examples = min(out.global_step * HF_BATCH, len(train_set))
    capped = examples < len(train_set)
    accuracy = None
    if not capped:
        pred = trainer.predict(dev_set)
        accuracy = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    return {
        "contender": spec["contender"], "label": SETUPS[spec["contender"]], "examples": examples,
        "steps": out.global_step, "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start, "examples_per_s": examples / train_seconds,
        "hf_train_samples_per_second": out.metrics.get("train_samples_per_second"),
        "dev_accuracy": accuracy, "capped": capped, "bf16": args.bf16,
        "params": sum(p.numel() for p in model.parameters()), "vocab_size": model.config.vocab_size,
    }


WORKERS = {"kiln": run_kiln, "hf-padded": run_hf, "hf-grouped": run_hf, "hf-grouped-best": run_hf}


def spawn(spec: dict) -> dict:
    return run_worker(__file__, spec)


# -- report -------------------------------------------------------------------------------------
def report(results: dict[str, dict]) -> dict:
    kiln = results["kiln"]
    rows = [("contender", "examples/s", "dev acc", "train s", "wall s")]
    for r in results.values():
        acc = "n/a (capped)" if r["capped"] else f"{r['dev_accuracy']:.4f}"
        rows.append((r["label"], f"{r['examples_per_s']:.1f}", acc, f"{r['train_seconds']:.1f}",
                     f"{r['wall_seconds']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
    print()
    ratios = {}
    for name, target in TARGETS.items():
        if name not in results:
            continue
        hf = results[name]
        ratio = kiln["examples_per_s"] / hf["examples_per_s"]
        speed_ok = ratio >= target
        if hf["capped"]:
            acc_ok, acc_note = None, f"accuracy not compared: capped at {hf['steps']} steps"
        else:
            acc_ok = kiln["dev_accuracy"] >= hf["dev_accuracy"]
            acc_note = (f"dev acc {kiln['dev_accuracy']:.4f} vs {hf['dev_accuracy']:.4f} "
                        f"({'met' if acc_ok else 'NOT met'})")
        ratios[name] = {"ratio": ratio, "target": target, "speed_met": speed_ok, "accuracy_met": acc_ok}
        print(f"kiln/{name}: {ratio:.2f}x examples/s (target >= {target:g}x: "
              f"{'met' if speed_ok else 'NOT met'}); {acc_note}")
    if any(r["capped"] for r in results.values()):
        print("(a capped set-up measures examples/s over its first steps only; "
              "--padded-max-steps 0 runs its full epoch)")
    return ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SST-2 dir with train.tsv, dev.tsv")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N train examples")
    parser.add_argument("--padded-max-steps", type=int, default=300,
                        help="cap set-up (a) at N steps (0: full epoch); default 300")
    parser.add_argument("--skip-padded", action="store_true", help="skip set-up (a)")
    parser.add_argument("--skip-grouped", action="store_true", help="skip set-up (b)")
    parser.add_argument("--skip-best", action="store_true", help="skip set-up (c)")
    parser.add_argument("--kiln-batch-tokens", type=int, default=None, help="kiln batch_tokens override")
    parser.add_argument("--kiln-lr", type=float, default=None, help="kiln lr override")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        serve_worker(args.worker, WORKERS)
        return

    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        workdir = Path(tmp)
        data = prepare_data(args.data.resolve(), args.limit, workdir)
        common = {"data": str(data), "workdir": str(workdir)}
        results = {"kiln": spawn({**common, "contender": "kiln", "batch_tokens": args.kiln_batch_tokens,
                                  "lr": args.kiln_lr})}
        hf_common = {**common, "tokenizer": results["kiln"]["tokenizer"],
                     "padded_max_steps": args.padded_max_steps}
        for name, skip in (("hf-padded", args.skip_padded), ("hf-grouped", args.skip_grouped),
                           ("hf-grouped-best", args.skip_best)):
            if not skip:
                results[name] = spawn({**hf_common, "contender": name})
    ratios = report(results)
    if args.out:
        payload = {"limit": args.limit, "padded_max_steps": args.padded_max_steps,
                   "results": results, "ratios": ratios}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
