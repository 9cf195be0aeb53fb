"""``kiln distill TEACHER DATA -n NAME [--profile STUDENT]``: ``kiln train`` of the teacher's task with
``distill.teacher`` set, so the student learns from the teacher's softened outputs too."""

from __future__ import annotations

import argparse

from kiln.cli.train import add_training_arguments
from kiln.cli.train import run as train_run
from kiln.errors import KilnError


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln distill``."""
    parser = commands.add_parser(
        "distill", help="train a small, fast student from a trained teacher",
        description="Train a student (--profile, default the task's own, bert-mini for the encoder tasks; or "
                    "--init) on DATA from the teacher's softened outputs and the labels. TEACHER is a kiln run of "
                    "sequence, sentence-pair or token; the student learns its task and labels. A student of the "
                    "teacher's family starts from a subset of its weights (--student-init), and the teacher also "
                    "labels perturbed copies of the training inputs (--augment). The teacher scores each input "
                    "once, cached for later runs.",
    )
    parser.add_argument("teacher", metavar="TEACHER", help="the teacher: a kiln run or its model directory")
    add_training_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train the student: the teacher's task, with ``distill.teacher`` set."""
    from pathlib import Path

    from kiln.files import read_json
    from kiln.model_files import KILN_FILE, model_dir_of

    teacher = Path(args.teacher).expanduser()
    if not teacher.exists():
        raise KilnError("no such teacher run", teacher)
    args.task = read_json(model_dir_of(teacher) / KILN_FILE, required=("task",))["task"]
    args.overrides = [f"distill.teacher={teacher.resolve()}", *args.overrides]
    return train_run(args)
