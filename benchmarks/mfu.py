"""Model FLOPs utilisation of kiln's training loop against this machine's measured matmul peak.

Reproduce (from the repository root)::

    .venv/bin/python benchmarks/mfu.py --out mfu.json

1. Peak: the best of several timed ``torch.matmul`` calls of 2048x2048 matrices in fp32 and bf16 on
   the training device (all cores), in FLOP/s.
2. Achieved: ``kiln train mlm`` with a bert-base-shaped stack (12 layers, 768 hidden, 12 heads,
   3072 feed-forward; ``--layers`` to shorten it) on WikiText-2, batch 16 x 128 tokens, after
   ``--warmup`` steps. Model FLOPs per token count what the model must compute, not what a
   wasteful implementation would: ``kiln.estimate.training_flops_per_token`` of the encoder
   (6 x its non-embedding parameters, plus attention scores and mixing, 12 x layers x hidden x seq)
   plus the MLM head (transform and vocabulary projection) at the masked 15 % of positions.
3. MFU = achieved / peak of the precision kiln ran in (``auto``: fp32 on CPUs without native
   bf16). The target is >= 40 % of the bf16 peak; on a CPU that emulates bf16 the bf16 peak is
   below the fp32 one, so both ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"
SEQ = 128
BATCH = 16


def matmul_peak(dtype: str, device: str, n: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on ``device``."""
    import torch

    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, device=device, dtype=kind)
    b = torch.randn(n, n, device=device, dtype=kind)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        if dtype == "bf16" and device == "cpu" and best > 5:  # emulated bf16: one sample is enough
            break
    return 2 * n**3 / best


def model_flops_per_token(config: dict) -> float:
    """Training FLOPs per token of a BERT MLM with a sparse head: encoder + head at 15 % of positions."""
    import torch
    from transformers import AutoConfig, AutoModel

    from kiln.estimate import parameter_counts, shape_of, training_flops_per_token

    architecture = AutoConfig.for_model(**config)
    with torch.device("meta"):
        encoder = AutoModel.from_config(architecture, add_pooling_layer=False)  # MLM runs no pooler
    hidden, vocab = architecture.hidden_size, architecture.vocab_size
    head = 6 * 0.15 * (hidden * hidden + hidden * vocab)  # transform + tied vocabulary projection
    return training_flops_per_token(parameter_counts(encoder)["non_embedding"], shape_of(architecture), SEQ) + head


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.getLogger("kiln").setLevel(logging.WARNING)

    import torch

    import kiln
    from kiln.training.device import resolve_device, resolve_precision

    device = resolve_device("auto")
    peaks = {p: matmul_peak(p, device.type) for p in ("fp32", "bf16")}
    with tempfile.TemporaryDirectory(prefix="kiln-mfu-") as tmp:
        # Train on train.txt; validate on a sliver of valid.txt (the end-of-run evaluation is not timed).
        data = Path(tmp) / "data"
        data.mkdir()
        (data / "train.txt").symlink_to((args.data / "train.txt").resolve())
        valid = (args.data / "valid.txt").read_text(encoding="utf-8").splitlines()[:200]
        (data / "valid.txt").write_text("\n".join(valid) + "\n", encoding="utf-8")
        run = kiln.train("mlm", data, name="mfu", profile="bert-base", output_dir=tmp,
                         max_steps=args.warmup + args.steps, overrides=[
                             f"model.config.num_hidden_layers={args.layers}", f"train.batch_size={BATCH}",
                             "train.grad_accum=1", "train.log_every=1", f"pretrain.seq_len={SEQ}",
                             "train.dropout=0.0"])
        logs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((run.model_dir / "config.json").read_text())
    steps = {r["step"]: r["elapsed"] for r in logs if "elapsed" in r and "split" not in r}
    seconds = steps[args.warmup + args.steps] - steps[args.warmup]
    tokens = args.steps * BATCH * SEQ
    flops_per_token = model_flops_per_token(config)
    layers = config["num_hidden_layers"]
    achieved = flops_per_token * tokens / seconds
    precision = resolve_precision("auto", device)
    result = {"device": str(device), "precision": precision, "peak_flops": peaks, "layers": layers,
              "tokens_per_s": tokens / seconds, "model_flops_per_token": flops_per_token,
              "achieved_flops": achieved, "mfu_vs_own_precision": achieved / peaks[precision],
              "mfu_vs_bf16_peak": achieved / peaks["bf16"], "threads": torch.get_num_threads()}
    print(f"peak matmul on {device}: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    print(f"kiln mlm, bert-base-shaped ({layers} layers) in {precision}: {tokens / seconds:.0f} tokens/s, "
          f"{achieved / 1e9:.1f} GFLOP/s")
    print(f"MFU: {result['mfu_vs_own_precision']:.1%} of the {precision} peak; "
          f"{result['mfu_vs_bf16_peak']:.1%} of the bf16 peak (target >= 40%)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
