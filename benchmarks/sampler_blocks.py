"""Batching packed pretraining blocks: the numpy path (``EqualBatches``) against the general path.

    .venv/bin/python benchmarks/sampler_blocks.py [--blocks 6000000] [--batch-size 32]

Each path cuts one shuffled epoch of equal-length blocks into batches in a fresh subprocess, and
reports its time and its peak RSS growth. Both give the same batches (``tests/test_batching.py``
checks that); the ratio is what the numpy path saves on a corpus of that many blocks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def worker(path: str, blocks: int, batch_size: int) -> dict:
    import resource
    import time

    import numpy as np

    from kiln.training.batching import TokenBudgetSampler

    sampler = TokenBudgetSampler(np.full(blocks, 128), batch_size=batch_size, seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    batches = sampler.batches(0) if path == "numpy" else sampler._length_batches(0)
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    return {"path": path, "batches": len(batches), "seconds": seconds, "rss_growth_mb": grown / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6_000_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.blocks, args.batch_size)))
        return
    results = {}
    for path in ("numpy", "lists"):
        out = subprocess.run([sys.executable, __file__, "--worker", path, "--blocks", str(args.blocks),
                              "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
        results[path] = json.loads(out.stdout)
        r = results[path]
        print(f"{path:<6} {r['batches']:>9,} batches  {r['seconds']:6.2f} s  {r['rss_growth_mb']:8.1f} MB")
    numpy_, lists = results["numpy"], results["lists"]
    print(f"lists / numpy: {lists['seconds'] / numpy_['seconds']:.1f}x time, "
          f"{lists['rss_growth_mb'] / max(numpy_['rss_growth_mb'], 1e-9):.1f}x memory")


if __name__ == "__main__":
    main()
