"""``kiln export``: a trained model as a self-contained ONNX directory (optionally int8), checked
against PyTorch with onnxruntime, and the runtime that predicts with such a directory.

An export directory holds ``model.onnx`` (dynamic batch and sequence axes), the tokenizer, the
model's ``config.json``, ``kiln.json`` (task, labels, settings, and an ``export`` entry: format,
quantization, the parity check and the validation metrics of the exported graph) and the model
card. ``kiln predict``, ``kiln evaluate`` and ``kiln serve`` accept it as they accept a run.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
# Tasks exported as one encoder graph, and the model outputs each one's decoding reads.
GRAPH_OUTPUTS = {"sequence": ("logits",), "sentence-pair": ("logits",), "token": ("logits",),
                 "qa": ("start_logits", "end_logits"), "mlm": ("logits",)}
PARITY_TOLERANCE = 1e-4  # fp32 ONNX against PyTorch, largest |difference| of any output


def onnxruntime() -> Any:
    """The onnxruntime module, or one line on how to get it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise KilnError("ONNX needs onnxruntime: pip install 'kiln-nlp[onnx]'") from None
    return ort


def is_onnx_export(path: str | Path) -> bool:
    """True when ``path`` is a directory ``kiln export`` wrote."""
    return (Path(path) / ONNX_FILE).is_file()


class OnnxModule:
    """An onnxruntime session called like the PyTorch model: keyword tensors in, an object with the
    graph's named outputs (torch tensors) out. Lets kiln's batching, decoding and metrics run on it."""

    def __init__(self, path: Path):
        ort = onnxruntime()
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # a damaged or foreign file: onnxruntime's own message, in one line
            raise KilnError(f"onnxruntime cannot load it: {str(error).splitlines()[0][:200]}", path) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.training = False

    def __call__(self, **inputs: Any) -> Any:
        import types

        import torch

        ids = inputs["input_ids"]
        defaults = {"attention_mask": torch.ones_like, "token_type_ids": torch.zeros_like}  # packed blocks have neither
        feed = {name: (inputs[name] if name in inputs else defaults[name](ids)).cpu().numpy()
                for name in self.input_names}
        values = [torch.from_numpy(v) for v in self.session.run(self.output_names, feed)]
        positions = inputs.get("masked_positions")
        if positions is not None:  # fill-mask: kiln's head reads the masks only, the graph gives every position
            values = [v.flatten(0, 1).index_select(0, positions.cpu()) for v in values]
        return types.SimpleNamespace(**dict(zip(self.output_names, values, strict=True)))

    def eval(self) -> OnnxModule:
        return self

    def train(self, mode: bool = True) -> OnnxModule:
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxModule:
        return self


INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


def _graph(model: Any, outputs: tuple[str, ...]) -> Any:
    """The HF model as a module with named tensor inputs and a tuple of the named outputs."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> tuple:
            extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            result = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra)
            return tuple(getattr(result, name) for name in outputs)

    return Graph().eval()


def export(run: str | Path, out: str | Path, quantize: str | None = None, eval_data: str | Path | None = None) -> dict:
    """Export the model of ``run`` to ``out`` as ONNX (``quantize="int8"``: dynamic int8 weights).

    Refuses a task it cannot export and an ``out`` that exists and is not empty; writes to a
    temporary sibling and renames it into place (:func:`kiln.training.checkpoint.new_dir`). Returns the
    ``export`` entry of ``kiln.json``.
    """
    import torch

    from kiln.predictor import Predictor
    from kiln.training.checkpoint import KILN_FILE, new_dir

    ort = onnxruntime()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KilnError("exists and is not an empty directory; kiln export writes a new one (choose another -o)", out)
    predictor = Predictor(run, device="cpu", precision="fp32")
    task = predictor.task
    if task.name not in GRAPH_OUTPUTS:
        known = ", ".join(GRAPH_OUTPUTS)
        raise KilnError(f"kiln export writes ONNX for {known} models; this one is a {task.name} model", predictor.path)
    if quantize not in (None, "int8"):
        raise KilnError(f"--quantize takes int8, not '{quantize}'")
    import transformers

    # The plain transformers model, not the predictor's (kiln patches a sequence model's last layer to
    # compute position 0 only): the graph is what transformers computes.
    model = getattr(transformers, task.auto_model).from_pretrained(predictor.path, local_files_only=True).eval()
    evaluation = _evaluation_set(predictor, eval_data)
    features = _sample_features(predictor, evaluation)
    batch = task.collate(features[:8], predictor.tokenizer.pad_token_id or 0)
    given = {**task.model_inputs(batch)}
    given.setdefault("attention_mask", torch.ones_like(given["input_ids"]))  # padded batches at predict time
    inputs = [name for name in INPUT_ORDER if name in given]
    example = {name: given[name] for name in inputs}
    outputs = GRAPH_OUTPUTS[task.name]
    tmp, commit = new_dir(out)
    try:
        graph_path = tmp / ONNX_FILE
        graph = _graph(model, outputs)
        _export_graph(graph, example, outputs, graph_path)
        with torch.inference_mode():
            reference = graph(**example)
        got = OnnxModule(graph_path)(**example)
        difference = max(float((getattr(got, name) - ref).abs().max()) for name, ref in zip(outputs, reference,
                                                                                          strict=True))
        if difference > PARITY_TOLERANCE:
            raise KilnError(f"the ONNX graph differs from PyTorch by {difference:.2e} (> {PARITY_TOLERANCE:g}); "
                            "not exported")
        from kiln.models import count_parameters

        entry: dict[str, Any] = {"format": "onnx", "quantize": quantize, "inputs": inputs, "outputs": list(outputs),
                                 "num_parameters": count_parameters(model),
                                 "parity_fp32_max_abs_diff": difference, "onnxruntime": ort.__version__}
        if evaluation is not None:
            entry["eval_data"] = str(evaluation[0])
            entry["metrics_fp32"] = _metrics(predictor, graph_path, evaluation[1])
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            fp32 = tmp / "model.fp32.onnx"
            graph_path.rename(fp32)
            root = logging.getLogger()
            level, root.level = root.level, logging.ERROR  # its advice to pre-process goes to the root logger
            try:
                quantize_dynamic(str(fp32), str(graph_path), weight_type=QuantType.QInt8, per_channel=True)
            finally:
                root.setLevel(level)
            fp32.unlink()
            if evaluation is not None:
                entry["metrics_int8"] = _metrics(predictor, graph_path, evaluation[1])
        for source in predictor.path.iterdir():  # all but the PyTorch weights, which the graph holds
            if source.is_file() and source.name != KILN_FILE and ".safetensors" not in source.name:
                shutil.copy2(source, tmp / source.name)
        meta = dict(predictor.meta)
        meta["export"] = entry
        (tmp / KILN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _card(tmp, entry)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def _export_graph(graph: Any, example: dict, outputs: tuple[str, ...], path: Path) -> None:
    """torch.onnx's dynamo exporter, batch and sequence axes dynamic."""
    import warnings

    import torch

    batch, sequence = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=2, max=8192)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(graph, (), kwargs=example, dynamo=True, input_names=list(example),
                                        output_names=list(outputs), verbose=False,
                                        dynamic_shapes={name: {0: batch, 1: sequence} for name in example})
        except Exception as error:
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise KilnError(f"torch.onnx could not export this model ({type(error).__name__}: {first})") from None
    program.save(str(path))


def _sample_features(predictor: Any, evaluation: tuple[Path, Any] | None) -> list[dict]:
    """A few encoded inputs to trace and check with: the model's stored examples, else validation ones."""
    from kiln.tasks.base import Dataset

    examples = predictor.meta.get("examples")
    if evaluation is not None and not examples:
        dataset = evaluation[1]
    else:  # inputs as predict takes them (for mlm: sentences with a mask, not corpus blocks)
        examples = examples or ["a short example sentence ."]
        dataset = Dataset("<examples>", [predictor.task.parse_input(x, i + 1) for i, x in enumerate(examples)])
    dataset = Dataset(dataset.path, dataset.examples[:16])
    return predictor.task.encode(dataset, predictor.tokenizer, predictor.max_length)


def _evaluation_set(predictor: Any, eval_data: str | Path | None) -> tuple[Path, Any] | None:
    """The labelled validation data to state the export's metrics on: ``eval_data``, else the run's own
    validation file when it has one."""
    from kiln.run import RUN_FILE
    from kiln.training.checkpoint import read_json

    path = Path(eval_data) if eval_data else None
    run_file = predictor.path.parent / RUN_FILE
    if path is None and run_file.is_file():
        try:  # the run's data may have moved since: then there is nothing to state metrics on
            path = predictor.task.find_splits(read_json(run_file, required=("data",))["data"]).get("validation")
        except KilnError:
            return None
    return None if path is None else (path, predictor.read(path, labelled=True))


def _metrics(predictor: Any, graph: Path, dataset: Any) -> dict:
    """The task's metrics of the ONNX graph at ``graph`` on ``dataset``."""
    runner = predictor.with_module(OnnxModule(graph))
    metrics = runner.evaluate(dataset)
    return {k: round(float(v), 6) for k, v in metrics.items() if isinstance(v, (int, float))}


def metric_lines(entry: dict) -> list[str]:
    """``fp32 dev.tsv: accuracy 0.8888, ...`` for each graph whose validation metrics ``entry`` holds."""
    lines = []
    for key, label in (("metrics_fp32", "fp32"), ("metrics_int8", "int8")):
        if key in entry:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in entry[key].items() if k != "n")
            lines.append(f"{label:<5} {Path(entry['eval_data']).name}: {shown}")
    return lines


def _card(directory: Path, entry: dict) -> None:
    """Add the export's facts to the model card."""
    card = directory / "README.md"
    lines = ["", "## ONNX export", "",
             f"`model.onnx`{' (int8 weights, dynamic quantization)' if entry['quantize'] else ''}, made by "
             "`kiln export`; onnxruntime runs it on its own, `kiln predict` on this directory too.",
             f"fp32 graph against PyTorch: largest difference {entry['parity_fp32_max_abs_diff']:.1e}.", "",
             *(f"- {line}" for line in metric_lines(entry))]
    text = card.read_text(encoding="utf-8") if card.is_file() else "# kiln model\n"
    card.write_text(text.rstrip("\n") + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
