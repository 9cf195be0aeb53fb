"""``kiln describe TASK DATA``: statistics of a dataset, read as ``kiln train`` reads it."""

from __future__ import annotations

import argparse

from kiln.cli.train import TASKS_HELP, add_setting_flag


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln describe``."""
    parser = commands.add_parser(
        "describe", help="statistics of a dataset: splits, labels, lengths, duplicates, leakage",
        description="Describe DATA as 'kiln train TASK DATA' would read it: examples per split, the label "
                    "distribution, lengths in characters and tokens, the share longer than 128/256/512 "
                    "tokens, duplicates within and across splits, and the task's own checks. Bad rows are "
                    "listed as findings (path:line) instead of stopping at the first.",
    )
    parser.add_argument("task", metavar="TASK", help=TASKS_HELP)
    parser.add_argument("data", metavar="DATA", help="data file or directory (as for kiln train)")
    parser.add_argument("-o", "--output", metavar="REPORT.html",
                        help="also write one self-contained HTML page with the tables and plots")
    parser.add_argument("--tokenizer", metavar="DIR|RUN",
                        help="count tokens with this tokenizer (a tokenizer directory or a kiln run's model/) "
                             "instead of whitespace-separated words")
    add_setting_flag(parser, "data.columns", default="default: the readers' own column names")
    add_setting_flag(parser, "generation.pair", default="default: none")
    parser.add_argument("-c", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a data setting as for kiln train, e.g. -c pretrain.paragraphs=true, "
                             "-c token.tag_scheme=iob2")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Describe the dataset, print the tables and write the page."""
    from kiln.describe import describe
    from kiln.html import print_sections, write_page
    from kiln.outputs import check_output

    inputs = [args.data, args.tokenizer]
    output = check_output(args.output, inputs, new_directories=False) if args.output else None
    description = describe(args.task, args.data, tokenizer=args.tokenizer, columns=getattr(args, "data.columns"),
                           pair=getattr(args, "generation.pair"), overrides=args.overrides)
    sections = description.sections(plots=output is not None)  # plots change no table: built once
    print_sections(sections)
    if output is not None:
        write_page(output, f"kiln describe {args.task} {args.data}", sections,
                   subtitle=f"Lengths in {description.counter}.")
        print(f"wrote {output}")
    return 0
