"""The classic GPU job: GPT-2 small on WikiText-2, 3 epochs, per-device batch 4, 1024-token blocks.

On GPUs (N = 1, 2, 4 or 8; ``--init`` a local GPT-2 checkpoint to fine-tune it as ``run_clm``
does, or leave it out to train from scratch)::

    .venv/bin/python benchmarks/gpt2_wikitext2.py --gpus N [--init /path/to/gpt2]

runs ``torchrun --nproc_per_node N -m kiln train clm wikitext-2 --profile gpt2 --epochs 3
--batch-size 4 -c pretrain.seq_len=1024 -c train.max_length=1024`` and prints its wall time next
to the historic HF figures (66m40s on 1 GPU, 40m19s on 2, 32m44s on 4, 29m19s on 8).

On a CPU, ``--smoke`` checks the same command end to end with a 2-layer, 64-wide GPT-2 and 5 steps.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"
HISTORIC = {1: "66m40s", 2: "40m19s", 4: "32m44s", 8: "29m19s"}


def command(data: Path, out: Path, gpus: int, init: str | None, smoke: bool) -> list[str]:
    launcher = ([shutil.which("torchrun") or "torchrun", f"--nproc_per_node={gpus}", "-m", "kiln"]
                if gpus > 1 else [sys.executable, "-m", "kiln"])
    cmd = [*launcher, "train", "clm", str(data), "-n", "gpt2-wikitext2", "--output-dir", str(out), "--overwrite",
           "--epochs", "3", "--batch-size", "4", "--grad-accum", "1",
           "-c", "pretrain.seq_len=1024", "-c", "train.max_length=1024"]
    cmd += ["--init", init] if init else ["--profile", "gpt2"]
    if smoke:
        cmd += ["-c", "model.config.n_layer=2", "-c", "model.config.n_embd=64", "-c", "model.config.n_head=2",
                "-c", "pretrain.seq_len=128", "--max-steps", "5"]
    return cmd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--init", default=None, help="local GPT-2 checkpoint to fine-tune (default: from scratch)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny GPT-2, 5 steps")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiln-gpt2-") as tmp:
        cmd = command(args.data, Path(tmp), args.gpus, args.init, args.smoke)
        print("$ " + " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
    minutes, seconds = divmod(round(wall), 60)
    print(f"\nwall time: {minutes}m{seconds:02d}s"
          + ("" if args.smoke else f" (historic HF on {args.gpus} GPU(s): {HISTORIC.get(args.gpus, 'n/a')})"))


if __name__ == "__main__":
    main()
