"""``kiln report RUN [RUN ...]``: curves, best and last metrics and configurations of runs."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln report``."""
    parser = commands.add_parser(
        "report", help="curves, metrics and configuration of one or more runs",
        description="Summarise training runs from their run directories: best and last metrics, parameters, "
                    "time taken, configuration (and, for several runs, how their configurations differ). "
                    "-o writes one self-contained HTML page with the loss, learning-rate, throughput, "
                    "gradient-norm and metric curves, every run overlaid. A run still training is reported "
                    "as it stands.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory (runs/NAME)")
    parser.add_argument("-o", "--output", metavar="REPORT.html", help="write one self-contained HTML page")
    parser.add_argument("--png", metavar="DIR", help="write each curve as DIR/NAME.png")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Read the runs, print the summary, write the page and the plots."""
    from kiln.html import print_sections, write_page, write_pngs
    from kiln.outputs import check_output
    from kiln.report import report

    output = check_output(args.output, args.runs, new_directories=False) if args.output else None
    if args.png:
        check_output(args.png, args.runs, directory=True)
    result = report(args.runs)
    sections = result.sections(plots=output is not None or bool(args.png))  # plots change no table
    print_sections(sections)
    if output is None and not args.png:
        return 0
    plots = [plot for section in sections for plot in section.plots]
    if args.png:
        written = write_pngs(args.png, plots)
        print(f"wrote {len(written)} plots to {args.png}")
    if output is not None:
        write_page(output, "kiln report: " + ", ".join(r.name for r in result.runs), sections,
                   subtitle=" · ".join(str(r.path) for r in result.runs))
        print(f"wrote {output}")
    return 0
