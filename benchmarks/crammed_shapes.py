"""Choose the CPU crammed-BERT shapes by measurement: validation MLM loss after one wall-clock budget.

Reproduce (from the repository root; budget x contenders plus ~1 minute of evaluation each)::

    .venv/bin/python benchmarks/crammed_shapes.py --budget 10m --out shapes-10m.json
    .venv/bin/python benchmarks/crammed_shapes.py --budget 60m crammed-bert-mini crammed-bert-small
    # a contender may carry -c overrides after a colon, e.g. the batch ramp to 256 sequences:
    .venv/bin/python benchmarks/crammed_shapes.py "crammed-bert-mini:train.grad_accum=4"

Each contender is ``kiln train mlm wikitext-2 --profile P --budget B`` in a fresh interpreter, one after
another (never side by side: they would share the two cores). All use the same cached 32768-token
WordPiece tokenizer (the profiles share it), and one evaluator (``mlm_common.mlm_loss``:
``AutoModelForMaskedLM``, fixed 15 % mask, seed 0) scores ``valid.txt``, so the losses compare.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_vs_hf import DEFAULT_DATA, run_eval
from workers import last_train_log, mlm_parser, run_worker, serve_worker

DEFAULT_SHAPES = ("crammed-bert-tiny", "crammed-bert-mini", "crammed-bert-small")


def run_kiln(spec: dict) -> dict:
    import kiln

    profile, _, overrides = spec["shape"].partition(":")
    run = kiln.train("mlm", spec["data"], name=spec["name"], profile=profile, output_dir=spec["workdir"],
                     overwrite=True, budget=spec["budget"], overrides=[o for o in overrides.split(",") if o])
    last = last_train_log(run.path)
    return {"shape": spec["shape"], "steps": last["step"], "train_seconds": last["elapsed"],
            "tokens": last.get("tokens"), "model": str(run.model_dir), "run": str(run.path)}


def main(argv: list[str] | None = None) -> None:
    parser = mlm_parser(__doc__, DEFAULT_DATA)
    parser.add_argument("shapes", nargs="*", default=list(DEFAULT_SHAPES),
                        help="profiles, each optionally PROFILE:key=value,key=value")
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the runs under this directory (reuse one with time_to_loss.py --kiln-run)")
    args = parser.parse_args(argv)
    if args.worker:
        serve_worker(args.worker, {"kiln": run_kiln, "eval": run_eval})
        return

    results = []
    with tempfile.TemporaryDirectory(prefix="kiln-shapes-") as tmp:
        workdir, data = str((args.keep or Path(tmp)).resolve()), str(args.data.resolve())
        for i, shape in enumerate(args.shapes):
            name = f"{i}-{shape.partition(':')[0]}-{args.budget}"
            r = run_worker(__file__, {"contender": "kiln", "shape": shape, "name": name, "budget": args.budget,
                                      "data": data, "workdir": workdir})
            r["valid_mlm_loss"] = run_worker(__file__, {"contender": "eval", "model": r["model"],
                                                        "tokenizer": r["model"], "data": data})["loss"]
            results.append(r)
            print(f"{shape:50s} {r['steps']:6d} steps  {r['train_seconds']:7.1f} s  "
                  f"valid MLM loss {r['valid_mlm_loss']:.4f}", flush=True)
    best = min(results, key=lambda r: r["valid_mlm_loss"])
    print(f"\nbest at {args.budget}: {best['shape']} (valid MLM loss {best['valid_mlm_loss']:.4f})")
    if args.out:
        args.out.write_text(json.dumps({"budget": args.budget, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
