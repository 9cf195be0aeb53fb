"""Validation MLM loss reached in a wall-clock budget: kiln's best CPU profile vs HF Trainer.

Reproduce (from the repository root; ~45 minutes with the defaults)::

    .venv/bin/python benchmarks/time_to_loss.py --out time_to_loss.json
    # or score an existing `kiln train mlm ... --budget 10m` run against HF:
    .venv/bin/python benchmarks/time_to_loss.py --kiln-run runs/pre --out time_to_loss.json

* kiln: ``kiln train mlm wikitext-2 --profile PROFILE --budget 10m`` (default ``crammed-bert-tiny``, the
  best at 10 minutes in ``crammed_shapes.py``),
  its own recipe (budget-triangle schedule, batch ramp, 25 % masking, sparse head).
* HF: ``Trainer`` + ``DataCollatorForLanguageModeling`` with a bert-small-like ``BertForMaskedLM``
  (4 layers, 512 hidden, 8 heads), batch 32, lr 5e-4, 6 % warmup and a linear schedule sized to
  its budget (default 30 minutes): a 60 s calibration run measures steps/s, the schedule is sized
  to budget x steps/s, and a callback stops training when the budget is spent.
* Both use kiln's trained tokenizer, so the losses are comparable, and one shared evaluator
  (``mlm_common.mlm_loss``: ``AutoModelForMaskedLM``, fixed 15 % mask, seed 0) scores ``valid.txt``.

Target: kiln at 10 minutes reaches a lower validation MLM loss than HF Trainer at 30 minutes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_vs_hf import DEFAULT_DATA
from workers import last_train_log, mlm_parser, run_worker, serve_worker


def spawn(spec: dict) -> dict:
    return run_worker(__file__, spec)


def run_kiln(spec: dict) -> dict:
    import kiln
    from kiln.config import parse_duration

    run = kiln.train("mlm", spec["data"], name="kiln-budget", profile=spec["profile"], output_dir=spec["workdir"],
                     overwrite=True, budget=spec["budget"])
    last = last_train_log(run.path)
    return {"contender": "kiln", "profile": spec["profile"], "budget_s": parse_duration(spec["budget"]),
            "train_seconds": last["elapsed"], "steps": last["step"], "model": str(run.model_dir),
            "tokenizer": str(run.model_dir)}


def run_hf(spec: dict) -> dict:
    from mlm_common import hf_train_mlm

    from kiln.config import parse_duration

    common = dict(tokenizer_dir=spec["tokenizer"], train=Path(spec["data"]) / "train.txt", hidden=512, layers=4,
                  heads=8, intermediate=2048, batch=32, lr=5e-4, warmup_ratio=0.06)
    calibration = hf_train_mlm(out=Path(spec["workdir"]) / "calibrate", max_steps=10**6, budget_s=60, **common)
    budget = parse_duration(spec["budget"])
    planned = max(1, int(budget * calibration["steps"] / calibration["train_seconds"]))
    result = hf_train_mlm(out=Path(spec["workdir"]), max_steps=planned, budget_s=budget, **common)
    return {"contender": "hf", "budget_s": budget, "planned_steps": planned, **result}


def main(argv: list[str] | None = None) -> None:
    parser = mlm_parser(__doc__, DEFAULT_DATA)
    parser.add_argument("--profile", default="crammed-bert-tiny")
    parser.add_argument("--kiln-budget", default="10m")
    parser.add_argument("--hf-budget", default="30m")
    parser.add_argument("--kiln-run", type=Path, default=None,
                        help="reuse a finished `kiln train mlm ... --budget` run directory instead of training")
    args = parser.parse_args(argv)
    if args.worker:
        from pretrain_vs_hf import run_eval

        serve_worker(args.worker, {"kiln": run_kiln, "hf": run_hf, "eval": run_eval})
        return

    with tempfile.TemporaryDirectory(prefix="kiln-ttl-") as tmp:
        common = {"data": str(args.data.resolve()), "workdir": tmp}
        if args.kiln_run:
            last = last_train_log(args.kiln_run)
            config = json.loads((args.kiln_run / "run.json").read_text())["config"]
            args.profile, args.kiln_budget = config["name"], config["train"]["budget"]
            model = str((args.kiln_run / "model").resolve())
            results = {"kiln": {"contender": "kiln", "profile": args.profile, "train_seconds": last["elapsed"],
                                "steps": last["step"], "model": model, "tokenizer": model, "reused": True}}
        else:
            results = {"kiln": spawn({**common, "contender": "kiln", "profile": args.profile,
                                      "budget": args.kiln_budget})}
        results["hf"] = spawn({**common, "contender": "hf", "budget": args.hf_budget,
                               "tokenizer": results["kiln"]["tokenizer"]})
        for r in results.values():
            r["valid_mlm_loss"] = spawn({**common, "contender": "eval", "model": r["model"],
                                         "tokenizer": results["kiln"]["tokenizer"]})["loss"]
    kiln_loss, hf_loss = results["kiln"]["valid_mlm_loss"], results["hf"]["valid_mlm_loss"]
    print(f"\nkiln {args.profile} @ {args.kiln_budget}: valid MLM loss {kiln_loss:.4f} "
          f"({results['kiln']['steps']} steps)")
    print(f"HF Trainer bert-small-like @ {args.hf_budget}: valid MLM loss {hf_loss:.4f} "
          f"({results['hf']['steps']} steps in {results['hf']['train_seconds']:.0f} s, "
          f"{results['hf']['tokens_per_s']:.0f} tokens/s)")
    print(f"target (kiln lower): {'met' if kiln_loss < hf_loss else 'NOT met'}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
