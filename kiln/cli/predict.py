"""``kiln predict RUN [DATA]``: a file, piped stdin, or an interactive prompt."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kiln.cli.train import add_model_flags, add_setting_flag
from kiln.errors import KilnError


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln predict``."""
    parser = commands.add_parser(
        "predict", help="predict with a trained model",
        description="Predict for DATA (or stdin lines; tab-separate the two texts of a pair). The output "
                    "keeps the input's format with predictions appended; --json prints HF-pipeline JSON.",
    )
    parser.add_argument("run_dir", metavar="RUN", help="run directory (runs/NAME) or model directory")
    parser.add_argument("data", metavar="DATA", nargs="?", help="input file (default: stdin)")
    parser.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    parser.add_argument("--json", action="store_true", help='print [{"label": ..., "score": ...}, ...]')
    add_setting_flag(parser, "data.columns", default="default: the run's own setting")
    add_model_flags(parser, "generation, clm, span: override a decoding setting, e.g. --generate num_beams=4")
    parser.set_defaults(run=run)


def write_predictions(predictor: Any, dataset: Any, predictions: list[Any], output: str | None,
                      as_json: bool) -> None:
    """Write predictions as JSON or in the input's format; a file is written atomically."""
    def emit(stream: Any) -> None:
        if as_json:
            stream.write(json.dumps(predictor.task.format(predictions, dataset), ensure_ascii=False) + "\n")
        else:
            predictor.task.write(dataset, predictions, stream)

    if not output:
        emit(sys.stdout)
        return
    target = Path(output)
    if target.is_dir():
        raise KilnError("is a directory; -o takes the path of the file to write", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    from kiln.files import atomic_file

    with atomic_file(target) as stream:
        emit(stream)


def run(args: argparse.Namespace) -> int:
    """Predict for a file, piped stdin, or lines typed at a prompt."""
    import kiln
    from kiln.outputs import check_output

    if args.output:  # before loading: a refused target costs nothing
        check_output(args.output, [args.run_dir, args.data])
    predictor = kiln.load(args.run_dir, device=args.device, precision=getattr(args, "train.precision"),
                          generate=args.generate, compile=getattr(args, "train.compile") or "off")
    if args.data is None and sys.stdin is None:  # started with stdin closed (`<&-`)
        raise KilnError("no input: give DATA, or pipe lines on stdin (it is closed)")
    if args.data is None and sys.stdin.isatty():
        return _interactive(predictor)
    source = args.data or "<stdin>"
    dataset = predictor.read(source, labelled=False, stream=sys.stdin if args.data is None else None,
                             columns=getattr(args, "data.columns"))
    predictions = predictor.predict_dataset(dataset)
    write_predictions(predictor, dataset, predictions, args.output, args.json)
    return 0


def _interactive(predictor: Any) -> int:
    pair = len(getattr(predictor.task, "text_roles", ())) > 1
    hint = "two texts separated by a tab" if pair else "a text"
    print(f"Type {hint} per line; Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        try:
            result = predictor.predict([line])[0]
        except Exception as err:
            print(err, file=sys.stderr)
            continue
        print(json.dumps(result, ensure_ascii=False))
