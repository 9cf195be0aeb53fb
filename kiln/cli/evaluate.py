"""``kiln evaluate RUN DATA``."""

from __future__ import annotations

import argparse
import json

from kiln.cli.train import add_model_flags, add_setting_flag


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln evaluate``."""
    parser = commands.add_parser("evaluate", help="score a trained model on labelled data",
                                 description="Compute the task's metrics for RUN on the labelled DATA file.")
    parser.add_argument("run_dir", metavar="RUN", help="run directory (runs/NAME) or model directory")
    parser.add_argument("data", metavar="DATA", help="labelled data file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-o", "--output", metavar="PREDICTIONS",
                        help="also write predictions, in DATA's format with predictions appended")
    add_setting_flag(parser, "data.columns", default="default: the run's own setting")
    add_model_flags(parser, "generation, clm, span: override a decoding setting, e.g. --generate num_beams=4",
                    compile=False)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics."""
    import kiln
    from kiln.cli.predict import write_predictions
    from kiln.outputs import check_output

    if args.output:  # before loading: a refused target costs nothing
        check_output(args.output, [args.run_dir, args.data])
    predictor = kiln.load(args.run_dir, device=args.device, precision=getattr(args, "train.precision"),
                          generate=args.generate)
    dataset = predictor.read(args.data, labelled=True, columns=getattr(args, "data.columns"))
    metrics, predictions = predictor.evaluate_with_predictions(dataset)
    if args.output:
        write_predictions(predictor, dataset, predictions, args.output, as_json=False)
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:<10} {value:.4f}" if isinstance(value, float) else f"{key:<10} {value}")
    return 0
