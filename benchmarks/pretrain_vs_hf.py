"""kiln ``train mlm`` vs HF ``Trainer`` + ``DataCollatorForLanguageModeling``: MLM tokens/s on WikiText-2.

Reproduce (from the repository root)::

    .venv/bin/python benchmarks/pretrain_vs_hf.py --steps 100 --out pretrain.json

Both contenders train the same architecture, kiln's ``bert-small`` profile (BERT, 4 layers, 512
hidden, 8 heads), on ``wikitext-2/train.txt`` in 128-token blocks, batch 32 sequences, the same
steps, lr and warmup, with kiln's trained WordPiece tokenizer (kiln trains it first and hands it to
HF). HF is ``run_mlm``: lines tokenized with [CLS]/[SEP], grouped into 128-token blocks, 15 %
dynamic masking by ``DataCollatorForLanguageModeling``. kiln is ``kiln.train("mlm", ...)``: packed
blocks from the memory-mapped corpus, 15 % masking, logits only at masked positions, no dropout.
Precision is ``auto`` for both (bf16 where the CPU has native bf16, i.e. AMX/AVX512-BF16, or on CUDA).

Tokens/s: steps x 32 x 128 over the training seconds (kiln: ``elapsed`` of the last step in
``metrics.jsonl``; HF: ``train_runtime``). Loss: one shared evaluator (``mlm_common.mlm_loss``) loads
both saved models through ``AutoModelForMaskedLM`` and scores ``valid.txt`` with a fixed 15 % mask.
A third contender, ``hf-best``, is HF Trainer with its fastest switches (``torch_compile=True``,
``optim="adamw_torch_fused"``; its compilation counts in its training time). Target: kiln ≥ 3x the
faster HF contender's tokens/s on 2 CPU cores.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import last_train_log, mlm_parser, run_worker, serve_worker

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"
BATCH = 32
LR = 5e-4
WARMUP = 0.06
TARGET = 3.0


def run_kiln(spec: dict) -> dict:
    import torch  # noqa: F401  (imported before timing, as in the HF worker)

    import kiln
    import kiln.training.trainer

    run = kiln.train("mlm", spec["data"], name="kiln-mlm", profile="bert-small", output_dir=spec["workdir"],
                     overwrite=True, max_steps=spec["steps"], lr=LR, overrides=[
                         f"train.batch_size={BATCH}", "train.grad_accum=1", "pretrain.seq_len=128",
                         "pretrain.mask_prob=0.15", f"schedule.warmup_ratio={WARMUP}", "train.log_every=10"])
    last = last_train_log(run.path)
    tokens = last["step"] * BATCH * 128
    return {"contender": "kiln", "steps": last["step"], "train_seconds": last["elapsed"], "tokens": tokens,
            "tokens_per_s": tokens / last["elapsed"], "model": str(run.model_dir), "tokenizer": str(run.model_dir),
            "params": sum(p.numel() for p in run.load().model.parameters())}


def run_hf(spec: dict) -> dict:
    import torch
    from mlm_common import hf_train_mlm

    from kiln.training.device import resolve_precision

    bf16 = resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu")) == "bf16"
    result = hf_train_mlm(tokenizer_dir=spec["tokenizer"], train=Path(spec["data"]) / "train.txt",
                          out=Path(spec["workdir"]), hidden=512, layers=4, heads=8, intermediate=2048,
                          batch=BATCH, lr=LR, max_steps=spec["steps"], warmup_ratio=WARMUP, bf16=bf16,
                          best=spec["contender"] == "hf-best")
    return {"contender": spec["contender"], **result}


def run_eval(spec: dict) -> dict:
    from mlm_common import mlm_loss

    return {"loss": mlm_loss(spec["model"], spec["tokenizer"], Path(spec["data"]) / "valid.txt")}


WORKERS = {"kiln": run_kiln, "hf": run_hf, "hf-best": run_hf, "eval": run_eval}
LABELS = {"kiln": "kiln train mlm", "hf": "HF Trainer + MLM collator", "hf-best": "HF + compile + fused AdamW"}


def spawn(spec: dict) -> dict:
    return run_worker(__file__, spec)


def main(argv: list[str] | None = None) -> None:
    parser = mlm_parser(__doc__, DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps for each contender")
    args = parser.parse_args(argv)
    if args.worker:
        serve_worker(args.worker, WORKERS)
        return

    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        common = {"data": str(args.data.resolve()), "workdir": tmp, "steps": args.steps}
        results = {"kiln": spawn({**common, "contender": "kiln"})}
        for name in ("hf", "hf-best"):
            results[name] = spawn({**common, "contender": name, "tokenizer": results["kiln"]["tokenizer"]})
        for r in results.values():
            r["valid_mlm_loss"] = spawn({**common, "contender": "eval", "model": r["model"],
                                         "tokenizer": results["kiln"]["tokenizer"]})["loss"]
    print()
    print(f"{'contender':<28}{'tokens/s':>10}{'train s':>10}{'steps':>7}{'valid MLM loss':>16}")
    for name, r in results.items():
        print(f"{LABELS[name]:<28}{r['tokens_per_s']:>10.0f}{r['train_seconds']:>10.1f}{r['steps']:>7}"
              f"{r['valid_mlm_loss']:>16.4f}")
    best = max(("hf", "hf-best"), key=lambda name: results[name]["tokens_per_s"])
    ratio = results["kiln"]["tokens_per_s"] / results[best]["tokens_per_s"]
    print(f"\nkiln/HF at its best ({LABELS[best]}): {ratio:.2f}x tokens/s "
          f"(target >= {TARGET:g}x: {'met' if ratio >= TARGET else 'NOT met'}); "
          f"kiln/HF defaults: {results['kiln']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"steps": args.steps, "results": results, "ratio": ratio, "best_hf": best},
                                       indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
