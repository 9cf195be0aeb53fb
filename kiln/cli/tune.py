"""``kiln tune TASK DATA -n NAME``: hyperparameter search over kiln runs (optuna)."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln tune``."""
    from kiln.cli.train import TASKS_HELP

    parser = commands.add_parser(
        "tune", help="search hyperparameters: many short kiln runs, the poor ones stopped early",
        description="Run --trials kiln train runs of TASK on DATA in OUTPUT_DIR/NAME/trial-NNN with settings "
                    "drawn from a space (TPE), stopping poor trials early (pruning), within an optional "
                    "wall-clock --budget. The study is OUTPUT_DIR/NAME/study.db (--resume continues it); the "
                    "best settings become OUTPUT_DIR/NAME/best.yaml, a profile for kiln train --profile.",
    )
    parser.add_argument("task", metavar="TASK", help=TASKS_HELP)
    parser.add_argument("data", metavar="DATA", help="data file or directory, as for kiln train")
    parser.add_argument("-n", "--name", required=True, help="the search's name; it goes to OUTPUT_DIR/NAME")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--profile", help="profile the trials start from (default: the task's own)")
    start.add_argument("--init", metavar="DIR", help="pretrained start, as kiln train --init")
    parser.add_argument("--trials", type=int, default=20, help="trials to run, every outcome counted "
                                                              "(default: 20)")
    parser.add_argument("--budget", default="", metavar="DURATION",
                        help="wall-clock budget of the whole search, e.g. 1h (a trial running at its end stops)")
    parser.add_argument("--space", metavar="YAML", help="setting keys and their ranges, e.g. optim.lr: {log: "
                                                        "[1e-5, 1e-3]} (default: lr, batch, epochs, weight "
                                                        "decay and warmup, for a scratch or pretrained start)")
    parser.add_argument("--metric", default="", help="the metric to optimise (default: the task's main one)")
    parser.add_argument("--jobs", type=int, default=1, help="trials at once, each in its own process with "
                                                            "its share of the cores (default: 1)")
    parser.add_argument("--pruner", default="asha", choices=("asha", "median", "none"),
                        help="asha: successive halving (default); median; none")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (default: 0)")
    parser.add_argument("--storage", metavar="URL", help="an optuna storage URL shared by several machines "
                                                         "(default: sqlite in OUTPUT_DIR/NAME/study.db)")
    parser.add_argument("--resume", action="store_true", help="continue a stopped search")
    parser.add_argument("--output-dir", default="runs", metavar="DIR", help="parent of the search (default: runs)")
    parser.add_argument("-c", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every trial, e.g. -c train.max_steps=200")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the search; the summary and best.yaml come from kiln.tuning."""
    import shlex
    import sys

    from kiln.tuning import tune

    argv = sys.argv[1:] if sys.argv[1:2] == ["tune"] else ["tune", args.task, args.data, "-n", args.name]
    command = shlex.join(["kiln", *argv, *([] if "--resume" in argv else ["--resume"])])
    tune(args.task, args.data, name=args.name, profile=args.profile, init=args.init, output_dir=args.output_dir,
         trials=args.trials, budget=args.budget, space=args.space, metric=args.metric, jobs=args.jobs,
         pruner=args.pruner, seed=args.seed, resume=args.resume, storage=args.storage, overrides=args.overrides,
         command=command)
    return 0
