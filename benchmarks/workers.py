"""Benchmark contenders run as workers: each in a fresh interpreter (own thread pools and memory),
its result one marked JSON line on stdout."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

RESULT_MARKER = "KILN_BENCH_RESULT "


def last_train_log(run_dir: str | Path) -> dict:
    """The last training line (step, elapsed, tokens …) of a kiln run's ``metrics.jsonl``."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "elapsed" in r and "split" not in r][-1]


def mlm_parser(doc: str, default_data: Path) -> argparse.ArgumentParser:
    """The options every worker-based MLM benchmark shares: --data, --out and the hidden --worker."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data, help="directory with train.txt, valid.txt")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def run_worker(script: str, spec: dict) -> dict:
    """Run ``script --worker SPEC`` in a fresh interpreter and return its result; ``spec["label"]``,
    when given, names it in the progress line instead of the contender (one contender run twice)."""
    name = spec.get("label", spec["contender"])
    print(f"== {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    sys.stderr.write(proc.stdout)
    raise SystemExit(f"{name} failed (exit {proc.returncode})")


def serve_worker(spec_json: str, workers: dict[str, Callable[[dict], dict]]) -> None:
    """The worker side: run the contender named in the spec and print its marked result."""
    logging.getLogger("kiln").setLevel(logging.WARNING)  # the contender's result is the output, not its log
    spec = json.loads(spec_json)
    print(RESULT_MARKER + json.dumps(workers[spec["contender"]](spec)), flush=True)
