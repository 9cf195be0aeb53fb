"""``kiln export RUN --format onnx [--quantize int8] [-o DIR]``: a model for onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln export``."""
    parser = commands.add_parser(
        "export", help="export a trained model as ONNX (optionally int8)",
        description="Write RUN's model as a self-contained ONNX directory (the graphs with dynamic batch and "
                    "sequence axes: model.onnx, or for generating models decoder_model.onnx with past keys and "
                    "values and, seq2seq, encoder_model.onnx; tokenizer, kiln.json, model card), checked against "
                    "PyTorch with onnxruntime. kiln predict, evaluate and serve accept the directory as they "
                    "accept a run.",
    )
    parser.add_argument("run_dir", metavar="RUN", help="run directory (runs/NAME) or model directory")
    parser.add_argument("--format", default="onnx", choices=("onnx",), help="export format (default onnx)")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="int8: onnxruntime's dynamic quantization of the weights (per channel)")
    parser.add_argument("-o", "--output", metavar="DIR", default=None,
                        help="the directory to write (new or empty; default exports/NAME)")
    parser.add_argument("--eval", metavar="FILE", default=None,
                        help="labelled data to state the export's metrics on (default: the run's validation file)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export, then say what was written and how well it scores."""
    import logging

    from kiln.export import export, metric_lines
    from kiln.model_files import model_dir_of
    from kiln.outputs import check_output

    model_dir = model_dir_of(args.run_dir)
    name = model_dir.parent.name if model_dir.name == "model" else model_dir.name
    out = Path(args.output) if args.output else Path("exports") / name
    check_output(out, [args.run_dir, args.eval], directory=True)
    entry = export(args.run_dir, out, quantize=args.quantize, eval_data=args.eval)
    log = logging.getLogger("kiln")
    kind = "int8 (dynamic quantization)" if entry["quantize"] else "fp32"
    graphs = " + ".join(entry["graphs"])
    log.info(f"exported {out}: {graphs} ({kind}); fp32 within {entry['parity_fp32_max_abs_diff']:.1e} of PyTorch")
    if "greedy_same_fp32" in entry:
        same, n = entry["greedy_same_fp32"]
        log.info(f"fp32 greedy decoding equals PyTorch's on {same} of {n} sample inputs")
    for line in metric_lines(entry):
        log.info(line)
    return 0
