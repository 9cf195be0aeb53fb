"""``kiln suite NAME DATA``: fine-tune one start on every task of a benchmark suite (GLUE)."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln suite``."""
    parser = commands.add_parser(
        "suite", help="fine-tune one start on every task of a suite (GLUE) and tabulate the scores",
        description="Fine-tune --init (or a profile's random start) on each task of SUITE, whose data "
                    "folders are in DATA, score each on its dev set, and print the table. Tasks "
                    "already done in --output-dir are not trained again; a stopped one resumes.",
    )
    parser.add_argument("suite", metavar="SUITE", help="suite name (glue) or a suite YAML path")
    parser.add_argument("data", metavar="DATA", help="the folder holding the suite's task folders")
    parser.add_argument("--init", metavar="MODEL", help="the start: as kiln train --init (default: random "
                                                        "weights from --profile)")
    parser.add_argument("--profile", help="profile for a random start, or the recipe base with --init")
    parser.add_argument("--tasks", metavar="A,B", help="comma-separated task names (default: the suite's own "
                                                       "set; glue: cola,sst2,mrpc,stsb,rte)")
    parser.add_argument("--recipe", default="sane", help="the suite's recipe (glue: sane, the cramming "
                                                         "protocol; fast, a CPU recipe) [default: sane]")
    parser.add_argument("--budget", metavar="DURATION", help="wall-clock budget per task, e.g. 10m")
    parser.add_argument("--output-dir", metavar="DIR", help="where the runs and results go "
                                                            "(default: runs/suite-SUITE-RECIPE)")
    parser.add_argument("--tune", type=int, default=0, metavar="N",
                        help="first search each small task's lr, epochs, batch size and warmup with N kiln tune "
                             "trials (within --budget), then train it with the best (needs optuna)")
    parser.add_argument("--json", action="store_true", help="print results.json instead of the table")
    parser.add_argument("-c", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting for every task")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the suite and print its table."""
    import json
    from pathlib import Path

    from kiln.suite import load_suite, run_suite, table

    suite = load_suite(args.suite)
    output = args.output_dir or f"runs/suite-{suite.name}-{args.recipe}"
    results = run_suite(suite, args.data, output, tasks=args.tasks, init=args.init, profile=args.profile,
                        recipe=args.recipe, budget=args.budget, overrides=args.overrides, tune=args.tune)
    text = table(suite, results)
    (Path(output) / "results.md").write_text(text + "\n")
    print(json.dumps(results, indent=2) if args.json else text)
    return 0
