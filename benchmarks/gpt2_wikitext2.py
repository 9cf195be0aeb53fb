"""The classic GPU job, kiln against HF Trainer side by side: GPT-2 small on WikiText-2, 3 epochs,
per-device batch 4, 1024-token blocks.

On one GPU (the whole check, both contenders and the evaluation, is sized to stay under 8 minutes on
an H100)::

    .venv/bin/python benchmarks/gpt2_wikitext2.py --out gpt2.json

1. ``kiln``: ``kiln train clm wikitext-2 --profile gpt2 --epochs 3 --batch-size 4
   -c pretrain.seq_len=1024`` (``--gpus N``: under ``torchrun``), from scratch, its tokenizer trained
   on ``train.txt``; ``--init DIR`` fine-tunes a local GPT-2 checkpoint instead, as ``run_clm`` does.
2. ``hf``: HF ``Trainer`` at its best on the same architecture and kiln's tokenizer: ``run_clm``'s
   grouping into 1,024-token blocks, batch 4, the same epochs, lr and warmup, bf16 where the GPU has
   it, ``torch_compile=True`` and ``optim="adamw_torch_fused"``.
3. One evaluator scores both saved models on ``valid.txt`` (1,024-token blocks, mean token
   cross-entropy, perplexity = exp of it).

Printed: wall and training seconds, tokens/s, MFU (model FLOPs per token as ``kiln.estimate``
counts them, 6 x non-embedding parameters plus attention, plus the tied output projection, against
the bf16 matmul peak measured on the same GPU) and validation perplexity for each, and the historic
``run_clm`` times (66m40s on 1 GPU, 40m19s on 2, 32m44s on 4, 29m19s on 8). Goal: kiln ≤ 60 s on
one H100 at ≥ 50 % MFU, with the perplexity of HF's run.

On a CPU, ``--smoke`` runs the same pipeline end to end with a 2-layer, 64-wide GPT-2, 128-token
blocks and 5 steps per contender.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import last_train_log, run_worker, serve_worker

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"
HISTORIC = {1: "66m40s", 2: "40m19s", 4: "32m44s", 8: "29m19s"}
EPOCHS, BATCH, SEQ = 3, 4, 1024
SMOKE = {"n_layer": 2, "n_embd": 64, "n_head": 2}


def command(data: Path, out: Path, gpus: int, init: str | None, smoke: bool) -> list[str]:
    """The ``kiln train clm`` command line of the job."""
    launcher = ([shutil.which("torchrun") or "torchrun", f"--nproc_per_node={gpus}", "-m", "kiln"]
                if gpus > 1 else [sys.executable, "-m", "kiln"])
    cmd = [*launcher, "train", "clm", str(data), "-n", "gpt2-wikitext2", "--output-dir", str(out), "--overwrite",
           "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--grad-accum", "1",
           "-c", f"pretrain.seq_len={SEQ}", "-c", f"train.max_length={SEQ}"]
    cmd += ["--init", init] if init else ["--profile", "gpt2"]
    if smoke:
        cmd += [*(x for k, v in SMOKE.items() for x in ("-c", f"model.config.{k}={v}")),
                "-c", "pretrain.seq_len=128", "--max-steps", "5"]
    return cmd


def run_kiln(spec: dict) -> dict:
    import subprocess

    out = Path(spec["workdir"])
    cmd = command(Path(spec["data"]), out, spec["gpus"], spec["init"], spec["smoke"])
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    wall = time.perf_counter() - start
    run = out / "gpt2-wikitext2"
    last = last_train_log(run)
    config = json.loads((run / "model" / "config.json").read_text())
    return {"contender": "kiln", "wall_seconds": wall, "train_seconds": last["elapsed"], "steps": last["step"],
            "tokens": last["tokens"], "model": str(run / "model"), "tokenizer": str(run / "model"),
            "seq": 128 if spec["smoke"] else SEQ, "config": config}


def run_hf(spec: dict) -> dict:
    """HF Trainer at its best, run_clm style, on kiln's tokenizer and architecture."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    start = time.perf_counter()
    seq = spec["seq"]
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    lines = (Path(spec["data"]) / "train.txt").read_text(encoding="utf-8").splitlines()
    ids = [t for line in tokenizer(lines)["input_ids"] for t in line]  # run_clm's group_texts
    blocks = [ids[i:i + seq] for i in range(0, len(ids) // seq * seq, seq)]
    dataset = [{"input_ids": b, "labels": b, "attention_mask": [1] * seq} for b in blocks]
    set_seed(42)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec["config"]))
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / "hf"), per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS, max_steps=spec["max_steps"] or -1, learning_rate=spec["lr"],
        warmup_steps=spec["warmup"], lr_scheduler_type="linear", weight_decay=0.01, seed=42,
        bf16=bf16, fp16=cuda and not bf16, use_cpu=not cuda, torch_compile=cuda,
        optim="adamw_torch_fused", report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=10**9, dataloader_num_workers=2 if cuda else 0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    result = trainer.train()
    model.save_pretrained(Path(spec["workdir"]) / "hf-model")
    return {"contender": "hf", "wall_seconds": time.perf_counter() - start,
            "train_seconds": result.metrics["train_runtime"], "steps": result.global_step,
            "tokens": result.global_step * BATCH * seq, "model": str(Path(spec["workdir"]) / "hf-model")}


def run_eval(spec: dict) -> dict:
    """Mean token cross-entropy of a saved model on valid.txt in ``seq``-token blocks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"]).to(device).eval()
    lines = (Path(spec["data"]) / "valid.txt").read_text(encoding="utf-8").splitlines()
    ids = [t for line in tokenizer(lines)["input_ids"] for t in line]
    seq = spec["seq"]
    blocks = torch.tensor([ids[i:i + seq] for i in range(0, len(ids) // seq * seq, seq)][:spec["eval_blocks"]])
    total = count = 0.0
    with torch.inference_mode():
        for start in range(0, len(blocks), 8):
            x = blocks[start:start + 8].to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(),
                                                             reduction="sum"))
            count += x[:, 1:].numel()
    return {"loss": total / count}


def run_peak(spec: dict) -> dict:
    import torch
    from mfu import matmul_peak

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "bf16" if device == "cpu" or torch.cuda.is_bf16_supported() else "fp32"
    return {"peak": matmul_peak(precision, device, n=4096 if device == "cuda" else 1024),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "precision": precision}


def flops_per_token(config: dict, seq: int) -> float:
    """Training FLOPs per token: kiln's PaLM accounting of the transformer (``kiln.estimate``) plus the
    tied output projection, which runs at every position."""
    import torch
    from transformers import AutoConfig, AutoModel

    from kiln.estimate import parameter_counts, shape_of, training_flops_per_token

    architecture = AutoConfig.for_model(**config)
    with torch.device("meta"):
        body = AutoModel.from_config(architecture)
    head = 6 * architecture.n_embd * architecture.vocab_size
    return training_flops_per_token(parameter_counts(body)["non_embedding"], shape_of(architecture), seq) + head


WORKERS = {"kiln": run_kiln, "hf": run_hf, "eval": run_eval, "peak": run_peak}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--init", default=None, help="local GPT-2 checkpoint to fine-tune (default: from scratch)")
    parser.add_argument("--skip-hf", action="store_true", help="kiln alone")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny GPT-2, 5 steps each")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve_worker(args.worker, WORKERS)
        return
    with tempfile.TemporaryDirectory(prefix="kiln-gpt2-") as tmp:
        common = {"data": str(args.data.resolve()), "workdir": tmp, "smoke": args.smoke}
        results = {"kiln": run_worker(__file__, {**common, "contender": "kiln", "gpus": args.gpus,
                                                  "init": args.init})}
        kiln = results["kiln"]
        if not args.skip_hf:
            recipe = json.loads((Path(kiln["model"]).parent / "run.json").read_text())["config"]
            warmup = recipe["schedule"]["warmup_steps"] or recipe["schedule"]["warmup_ratio"]
            results["hf"] = run_worker(__file__, {
                **common, "contender": "hf", "tokenizer": kiln["tokenizer"], "config": kiln["config"],
                "seq": kiln["seq"], "lr": recipe["optim"]["lr"], "warmup": warmup,
                "max_steps": 5 if args.smoke else 0})
        for result in results.values():
            loss = run_worker(__file__, {**common, "contender": "eval", "model": result["model"],
                                         "tokenizer": kiln["tokenizer"], "seq": kiln["seq"],
                                         "eval_blocks": 16 if args.smoke else 10**9})["loss"]
            result.update(valid_loss=loss, valid_ppl=math.exp(loss))
        peak = run_worker(__file__, {**common, "contender": "peak"})
    per_token = flops_per_token(kiln["config"], kiln["seq"])
    print(f"\n{peak['device']}, matmul peak {peak['peak'] / 1e12:.1f} TFLOP/s ({peak['precision']}); "
          f"{per_token / 1e6:.0f} MFLOP per token")
    print(f"{'contender':<34}{'wall s':>8}{'train s':>9}{'tokens/s':>11}{'MFU':>7}{'valid ppl':>11}")
    for name, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["train_seconds"]
        r["mfu"] = r["tokens_per_s"] * per_token / peak["peak"]
        label = "kiln train clm" if name == "kiln" else "HF Trainer (compile, fused AdamW)"
        print(f"{label:<34}{r['wall_seconds']:>8.1f}{r['train_seconds']:>9.1f}{r['tokens_per_s']:>11.0f}"
              f"{r['mfu']:>7.1%}{r['valid_ppl']:>11.2f}")
    if not args.smoke:
        print(f"historic HF run_clm on {args.gpus} GPU(s): {HISTORIC.get(args.gpus, 'n/a')}; "
              f"goal: kiln <= 60 s at >= 50 % MFU on one H100, with HF's perplexity")
    if args.out:
        args.out.write_text(json.dumps({"peak": peak, "flops_per_token": per_token, "results": results},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
