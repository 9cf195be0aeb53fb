"""Language modelling on Tiny Shakespeare for the same wall-clock budget from SmolLM2-135M-Instruct
(every weight, and LoRA) and from scratch (the same architecture and tokenizer, random weights),
one after the other on the same machine, each in its own process.

Reproduce (from the repository root, after ``make pretrained``; 3 x (budget + evaluation))::

    .venv/bin/python benchmarks/smollm2_clm.py --budget 10m --out bench.json

Smoke test::

    .venv/bin/python benchmarks/smollm2_clm.py --budget 1m

* ``full``: ``kiln train clm ../shared/data/tinyshakespeare --init models/SmolLM2-135M-Instruct
  --budget B`` (the ``_causal`` recipe: lr 5e-5, cosine, 256-token blocks, 4,096-token batches);
* ``lora``: the same with ``--lora`` (rank 8 on q_proj and v_proj; lr 5e-4);
* ``scratch``: the same recipe and budget from random weights: a profile with SmolLM2's
  ``config.json`` (Llama, 30 x 576) and its tokenizer (``--tokenizer``), lr 5e-4 (a from-scratch rate).

kiln holds out 10 % of ``input.txt`` (the same lines for all three). Reported: validation loss and
perplexity (per token of SmolLM2's tokenizer, so the three compare), steps and tokens trained, and
a greedy sample continuing "ROMEO:".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import last_train_log, run_worker, serve_worker

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare"
DEFAULT_INIT = REPO / "models" / "SmolLM2-135M-Instruct"
PROMPT = "ROMEO:"


def scratch_profile(init: Path, folder: Path) -> Path:
    """A profile of SmolLM2's architecture (its config.json), for random weights."""
    import yaml

    config = json.loads((init / "config.json").read_text())
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in
            ("architectures", "dtype", "transformers_version", "model_type", "use_cache")}
    profile = {"name": "smollm2-scratch", "base": "_causal", "tasks": ["clm"], "optim": {"lr": 5.0e-4},
               "model": {"type": config["model_type"], "config": keep}}
    path = folder / "smollm2-scratch.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


def clm_worker(spec: dict) -> dict:
    import kiln

    init = Path(spec["init"])
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        kwargs: dict = {"budget": spec["budget"]}
        if spec["contender"] == "scratch":
            kwargs.update(profile=str(scratch_profile(init, Path(scratch))), tokenizer=str(init))
        else:
            kwargs["init"] = str(init)
        if spec["contender"] == "lora":
            kwargs["lora.r"] = 8
        run = kiln.train("clm", spec["data"], name="clm", output_dir=scratch, **kwargs)
        last = last_train_log(run.path)
        sample = run.load(device="cpu", generate=["max_new_tokens=48"]).predict([PROMPT])[0][0]["generated_text"]
    return {"loss": run.metrics["loss"], "perplexity": run.metrics["perplexity"], "steps": last["step"],
            "tokens": last.get("tokens"), "sample": sample, "wall_seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the tinyshakespeare folder")
    parser.add_argument("--init", type=Path, default=DEFAULT_INIT, help="SmolLM2-135M-Instruct (make pretrained)")
    parser.add_argument("--budget", default="10m", help="training wall clock of each run (default: 10m)")
    parser.add_argument("--contenders", default="full,lora,scratch", help="which runs (default: all three)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker(args.worker, {"full": clm_worker, "lora": clm_worker, "scratch": clm_worker})
        return
    results = {}
    for name in args.contenders.split(","):
        results[name] = run_worker(__file__, {"contender": name, "data": str(args.data), "init": str(args.init),
                                              "budget": args.budget})
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nTiny Shakespeare, {args.budget} of training each (validation, SmolLM2's tokens)")
    for name, r in results.items():
        print(f"  {name:7s} perplexity {r['perplexity']:8.2f}  loss {r['loss']:.4f}  {r['steps']} steps  "
              f"sample {r['sample'][:80]!r}")


if __name__ == "__main__":
    main()
