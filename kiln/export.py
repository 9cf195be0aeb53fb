"""``kiln export``: a trained model as a self-contained ONNX directory (optionally int8), checked
against PyTorch with onnxruntime, and the runtime that predicts with such a directory.

An export directory holds the graphs, the tokenizer, the model's ``config.json`` (and
``generation_config.json``), ``kiln.json`` (task, labels, settings, and an ``export`` entry: format,
quantization, the parity check and the validation metrics of the exported graph) and the model
card. ``kiln predict``, ``kiln evaluate`` and ``kiln serve`` accept it as they accept a run.

Encoder tasks are one graph, ``model.onnx``, with dynamic batch and sequence axes. Generating models
keep past keys and values between steps, as transformers does, so decoding is not quadratic: a
decoder-only model is ``decoder_model.onnx`` (``past.*`` in, ``present.*`` out; the first step passes
a past of length 0); a seq2seq model adds ``encoder_model.onnx``, which also returns the
cross-attention keys and values each decoding step reads. transformers' ``generate()`` drives the
graphs (:func:`onnx_model`), so greedy, beam search and sampling decode exactly as the PyTorch model.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DECODER_FILE, ENCODER_FILE = "decoder_model.onnx", "encoder_model.onnx"
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
    return any((Path(path) / name).is_file() for name in (ONNX_FILE, DECODER_FILE))


def session(path: Path) -> Any:
    """An onnxruntime CPU session of the graph at ``path``; a file it cannot load is one line."""
    ort = onnxruntime()
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # a damaged or foreign file: onnxruntime's own message, in one line
        raise KilnError(f"onnxruntime cannot load it: {str(error).splitlines()[0][:200]}", path) from None


def onnx_model(directory: str | Path) -> Any:
    """What runs an export directory: :class:`OnnxModule` for an encoder graph, else the generating
    graphs as a transformers model (``generate()`` included)."""
    directory = Path(directory)
    return OnnxModule(directory / ONNX_FILE) if (directory / ONNX_FILE).is_file() else _generator(directory)


class OnnxModule:
    """An onnxruntime session called like the PyTorch model: keyword tensors in, an object with the
    graph's named outputs (torch tensors) out. Lets kiln's batching, decoding and metrics run on it."""

    def __init__(self, path: Path):
        self.session = session(path)
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


def _kv_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def flat(cache: Any) -> list:
    """A DynamicCache's tensors, layer by layer: key, value."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def pairs(tensors: Sequence[Any]) -> list[tuple[Any, Any]]:
    """Consecutive (key, value) pairs of a flat list."""
    return [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]


def _generator(directory: Path) -> Any:
    """The export's generating graphs behind a transformers model (:mod:`kiln.onnx_generate`, which
    imports torch and transformers: only when an export generates)."""
    from kiln.onnx_generate import OnnxGenerator

    return OnnxGenerator.from_directory(directory)


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


def _generative_graphs(model: Any) -> dict[str, tuple[Any, list[str], list[str]]]:
    """``{file: (module, input names, output names)}`` for a generating model: the decoder with past
    keys and values in and out, and for a seq2seq model the encoder, which also computes the
    decoder's cross-attention keys and values once per input."""
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    past, present = _kv_names("past", layers), _kv_names("present", layers)

    class DecoderOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple:
            cache = DynamicCache(pairs(past))
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                cache=cache, use_cache=True, return_dict=True).logits
            return (logits, *flat(cache))

    if not model.config.is_encoder_decoder:
        return {DECODER_FILE: (DecoderOnly(), ["input_ids", "attention_mask", "position_ids", *past],
                               ["logits", *present])}

    start = model.config.decoder_start_token_id

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> tuple:
            hidden = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            # One decoder step fills the cross-attention cache; the exporter keeps only what that needs
            # (each layer's key and value projections of the encoder output).
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            self.model.get_decoder()(input_ids=torch.full_like(input_ids[:, :1], start), encoder_hidden_states=hidden,
                                     encoder_attention_mask=attention_mask, cache=cache, use_cache=True)
            return hidden, torch.stack(flat(cache.cross_attention_cache), dim=1)

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, decoder_input_ids: Any, encoder_attention_mask: Any, encoder_hidden_states: Any,
                    cross_key_values: Any, *past: Any) -> tuple:
            cache = EncoderDecoderCache(DynamicCache(pairs(past)), DynamicCache(pairs(cross_key_values.unbind(1))))
            logits = self.model(decoder_input_ids=decoder_input_ids, attention_mask=encoder_attention_mask,
                                encoder_outputs=(encoder_hidden_states,), cache=cache, use_cache=True,
                                return_dict=True).logits
            return (logits, *flat(cache.self_attention_cache))

    return {ENCODER_FILE: (Encoder(), ["input_ids", "attention_mask"], ["last_hidden_state", "cross_key_values"]),
            DECODER_FILE: (Decoder(), ["decoder_input_ids", "encoder_attention_mask", "encoder_hidden_states",
                                       "cross_key_values", *past], ["logits", *present])}


def _export_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> tuple:
    """transformers' SDPA attention, its output in a fresh contiguous tensor: torch 2.13's export
    decomposition drops the ``.contiguous()`` behind transformers' reshape of the (batch, length,
    heads, size) output, and T5 then fails to export."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out.new_empty(out.shape).copy_(out), weights


def _generative_examples(model: Any, batch: dict, decoder_only: bool) -> tuple[dict, dict]:
    """Example inputs for each graph (a past of 3 positions: the exporter needs a length it can
    make symbolic; the graph then takes any, 0 included) and their dynamic axes."""
    import torch

    ids = batch["prompt_ids"] if decoder_only else batch["input_ids"]
    mask = batch["prompt_mask"] if decoder_only else batch["attention_mask"]
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    size = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // \
        config.num_attention_heads
    n, steps = ids.shape[0], 3
    past = [torch.randn(n, heads, steps, size) for _ in range(2 * config.num_hidden_layers)]
    dim = torch.export.Dim
    batch_dim, length, past_len = dim("batch", min=1, max=1024), dim("sequence", min=2, max=8192), \
        dim("past", min=1, max=8192)
    new, total = dim("new", min=1, max=8192), dim("total", min=2, max=16384)
    past_axes = tuple({0: batch_dim, 2: past_len} for _ in past)
    if decoder_only:
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([torch.ones(n, steps, dtype=mask.dtype), mask], dim=1)
        return ({DECODER_FILE: (ids, full_mask, position + steps, *past)},
                {DECODER_FILE: ({0: batch_dim, 1: new}, {0: batch_dim, 1: total}, {0: batch_dim, 1: new}, past_axes)})
    with torch.inference_mode():
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        cross = torch.randn(n, 2 * config.num_hidden_layers, heads, ids.shape[1], size)
    decoder_ids = torch.full((n, 2), model.config.decoder_start_token_id, dtype=torch.long)
    return ({ENCODER_FILE: (ids, mask), DECODER_FILE: (decoder_ids, mask, hidden, cross, *past)},
            {ENCODER_FILE: ({0: batch_dim, 1: length}, {0: batch_dim, 1: length}),
             DECODER_FILE: ({0: batch_dim, 1: new}, {0: batch_dim, 1: length}, {0: batch_dim, 1: length},
                            {0: batch_dim, 3: length}, past_axes)})


def _generative_parity(model: Any, generator: Any, batch: dict, decoder_only: bool) -> float:
    """Largest |difference| between the PyTorch logits and the graphs', the graphs stepping with their
    past: all positions but the last, then the last one alone."""
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    with torch.inference_mode():
        if decoder_only:
            ids, mask = batch["prompt_ids"], batch["prompt_mask"]
            position = (mask.cumsum(-1) - 1).clamp(min=0)
            reference = model(input_ids=ids, attention_mask=mask, position_ids=position).logits
            cache: Any = DynamicCache()
            first = generator(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position[:, :-1],
                              cache=cache).logits
            last = generator(input_ids=ids[:, -1:], attention_mask=mask, position_ids=position[:, -1:],
                             cache=cache).logits
            keep = mask.bool()  # a fully masked (left-padding) position has no right answer
        else:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            targets = torch.cat([torch.full_like(ids[:, :1], model.config.decoder_start_token_id), ids[:, :4]], 1)
            reference = model(input_ids=ids, attention_mask=mask, decoder_input_ids=targets).logits
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            encoded = generator.get_encoder()(input_ids=ids, attention_mask=mask)
            first = generator(decoder_input_ids=targets[:, :-1], attention_mask=mask, encoder_outputs=encoded,
                              cache=cache).logits
            last = generator(decoder_input_ids=targets[:, -1:], attention_mask=mask, encoder_outputs=encoded,
                             cache=cache).logits
            keep = torch.ones(targets.shape, dtype=torch.bool)
        got = torch.cat([first, last], dim=1)
    return float((got - reference).abs()[keep].max())


def export(run: str | Path, out: str | Path, quantize: str | None = None, eval_data: str | Path | None = None) -> dict:
    """Export the model of ``run`` to ``out`` as ONNX (``quantize="int8"``: dynamic int8 weights).

    Refuses a task it cannot export and an ``out`` that exists and is not empty; writes to a
    temporary sibling and renames it into place (:func:`kiln.files.new_dir`). Returns the
    ``export`` entry of ``kiln.json``.
    """
    from kiln.files import new_dir
    from kiln.model_files import KILN_FILE
    from kiln.predictor import Predictor

    onnxruntime()  # without it, one line says how to get it, before anything is read
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KilnError("exists and is not an empty directory; kiln export writes a new one (choose another -o)", out)
    predictor = Predictor(run, device="cpu", precision="fp32")
    task = predictor.task
    if not task.export_outputs and not task.generates:
        from kiln.tasks import TASKS, task_class

        known = ", ".join(name for name in TASKS if task_class(name).export_outputs or task_class(name).generates)
        raise KilnError(f"kiln export writes ONNX for {known} models; this one is a {task.name} model", predictor.path)
    if quantize not in (None, "int8"):
        raise KilnError(f"--quantize takes int8, not '{quantize}'")
    import transformers

    # The plain transformers model, not the predictor's (kiln patches a sequence model's last layer to
    # compute position 0 only): the graph is what transformers computes.
    model = getattr(transformers, task.auto_model).from_pretrained(predictor.path, local_files_only=True).eval()
    evaluation = _evaluation_set(predictor, eval_data)
    sample = _sample(predictor, evaluation)
    tmp, commit = new_dir(out)
    try:
        entry = _write(model, predictor, sample, evaluation, quantize, tmp)
        for source in predictor.path.iterdir():  # all but the PyTorch weights, which the graphs hold
            if source.is_file() and source.name != KILN_FILE and ".safetensors" not in source.name \
                    and not (tmp / source.name).exists():  # a generating export copied its configs already
                shutil.copy2(source, tmp / source.name)
        (tmp / KILN_FILE).write_text(json.dumps({**predictor.meta, "export": entry}, indent=2) + "\n")
        _card(tmp, entry)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def _write(model: Any, predictor: Any, sample: Any, evaluation: tuple[Path, Any] | None, quantize: str | None,
           directory: Path) -> dict:
    """The graphs in ``directory``, checked against PyTorch, quantized if asked, and scored on the
    validation data; returns the ``export`` entry of ``kiln.json``."""
    from kiln.models import count_parameters

    write = _write_generative if predictor.task.generates else _write_encoder
    graphs, checks = write(model, predictor, sample, directory)
    if checks["parity_fp32_max_abs_diff"] > PARITY_TOLERANCE:
        raise KilnError(f"the ONNX graph differs from PyTorch by {checks['parity_fp32_max_abs_diff']:.2e} "
                        f"(> {PARITY_TOLERANCE:g}); not exported")
    entry = {"format": "onnx", "quantize": quantize, "graphs": graphs, **checks,
             "num_parameters": count_parameters(model), "onnxruntime": onnxruntime().__version__}
    if evaluation is not None:
        entry["eval_data"] = str(evaluation[0])
        entry["metrics_fp32"] = _metrics(predictor, directory, evaluation[1])
    if quantize == "int8":
        for graph in graphs:
            _quantize(directory / graph)
        if evaluation is not None:
            entry["metrics_int8"] = _metrics(predictor, directory, evaluation[1])
    return entry


def _write_encoder(model: Any, predictor: Any, sample: Any, directory: Path) -> tuple[list[str], dict]:
    """``model.onnx``, checked against PyTorch on a sample batch."""
    import torch

    task = predictor.task
    features = task.encode(sample, predictor.tokenizer, predictor.max_length)
    batch = task.collate(features[:8], predictor.tokenizer.pad_token_id or 0)
    given = {**task.model_inputs(batch)}
    given.setdefault("attention_mask", torch.ones_like(given["input_ids"]))  # padded batches at predict time
    inputs = [name for name in INPUT_ORDER if name in given]
    example = {name: given[name] for name in inputs}
    outputs = task.export_outputs
    graph = _graph(model, outputs)
    # The task names its inputs' axes (multiple-choice: batch, choices, sequence); each one is dynamic.
    dims = {"batch": torch.export.Dim("batch", min=1, max=1024),
            "sequence": torch.export.Dim("sequence", min=2, max=8192)}
    dims.update({axis: torch.export.Dim(axis, min=1, max=1024) for axis in task.export_axes if axis not in dims})
    axes = {name: {i: dims[axis] for i, axis in enumerate(task.export_axes)} for name in inputs}
    _export_graph(graph, tuple(example.values()), inputs, list(outputs), tuple(axes.values()), directory / ONNX_FILE)
    with torch.inference_mode():
        reference = graph(**example)
    got = OnnxModule(directory / ONNX_FILE)(**example)
    real = example["attention_mask"].sum(-1) > 0

    def gap(ours: Any, theirs: Any) -> float:
        diff = (ours - theirs).abs()
        if diff.shape == real.shape:  # one output per candidate: a padded candidate has no right answer
            diff = diff[real]
        return float(diff.max())

    difference = max(gap(getattr(got, name), ref) for name, ref in zip(outputs, reference, strict=True))
    return [ONNX_FILE], {"inputs": inputs, "outputs": list(outputs), "parity_fp32_max_abs_diff": difference}


def _write_generative(model: Any, predictor: Any, sample: Any, directory: Path) -> tuple[list[str], dict]:
    """The decoder (and encoder) graphs, checked against PyTorch stepping with past keys and values,
    and greedy decoding of the sample inputs compared with the PyTorch model's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    task = predictor.task
    decoder_only = not model.config.is_encoder_decoder
    features = task.encode(sample, predictor.tokenizer, predictor.max_length)
    batch = task.collate(features[:8], predictor.tokenizer.pad_token_id or 0)
    graphs = _generative_graphs(model)
    examples, axes = _generative_examples(model, batch, decoder_only)
    AttentionInterface.register("kiln_export", _export_attention)
    AttentionMaskInterface.register("kiln_export", sdpa_mask)  # the masks SDPA takes
    implementation = model.config._attn_implementation
    model.set_attn_implementation("kiln_export")
    try:
        for name, (module, inputs, outputs) in graphs.items():
            _export_graph(module.eval(), examples[name], inputs, outputs, axes[name], directory / name)
    finally:
        model.set_attn_implementation(implementation)
    for name in ("config.json", "generation_config.json"):  # what the generator reads, before the rest
        if (predictor.path / name).is_file():
            shutil.copy2(predictor.path / name, directory / name)
    generator = task.adopt(_generator(directory))
    difference = _generative_parity(model, generator, batch, decoder_only)
    # Greedy decoding of the sample inputs, as kiln predict decodes them, by PyTorch and by the graphs.
    greedy = predictor._task_for({"generate.num_beams": 1, "generate.do_sample": False})
    ours = predictor._run(sample, greedy)[0]
    theirs = predictor.with_module(generator)._run(sample, greedy)[0]
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    return list(graphs), {"parity_fp32_max_abs_diff": difference, "greedy_same_fp32": [same, len(ours)]}


def _quantize(graph: Path) -> None:
    """onnxruntime's dynamic int8 quantization of ``graph``'s weights (per channel), in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = graph.with_suffix(".fp32.onnx")
    graph.rename(fp32)
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # its advice to pre-process goes to the root logger
    try:
        quantize_dynamic(str(fp32), str(graph), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    fp32.unlink()


def _export_graph(module: Any, args: tuple, inputs: list[str], outputs: list[str], axes: tuple, path: Path) -> None:
    """torch.onnx's dynamo exporter, with the dynamic axes ``axes`` (one entry per argument)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                        verbose=False, dynamic_shapes=axes)
        except Exception as error:
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise KilnError(f"torch.onnx could not export this model ({type(error).__name__}: {first})") from None
    assert program is not None  # dynamo=True always gives one
    program.save(str(path))


def _sample(predictor: Any, evaluation: tuple[Path, Any] | None) -> Any:
    """A few inputs to trace and check with: the model's stored examples, else validation ones."""
    from kiln.tasks.base import Dataset

    examples = predictor.meta.get("examples")
    if evaluation is not None and not examples:
        dataset = evaluation[1]
    else:  # inputs as predict takes them (for mlm: sentences with a mask, not corpus blocks)
        examples = examples or ["a short example sentence ."]
        dataset = Dataset("<examples>", [predictor.task.parse_input(x, i + 1) for i, x in enumerate(examples)])
    return Dataset(dataset.path, dataset.examples[:16])


def _evaluation_set(predictor: Any, eval_data: str | Path | None) -> tuple[Path, Any] | None:
    """The labelled validation data to state the export's metrics on: ``eval_data``, else the run's own
    validation file when it has one."""
    from kiln.files import read_json
    from kiln.model_files import RUN_FILE
    from kiln.tasks.base import Dataset

    path = Path(eval_data) if eval_data else None
    run_file = predictor.path.parent / RUN_FILE
    if path is None and run_file.is_file():
        try:  # the run's data may have moved since: then there is nothing to state metrics on
            path = predictor.task.find_splits(read_json(run_file, required=("data",))["data"]).get("validation")
        except KilnError:
            return None
    if path is None:
        return None
    dataset = predictor.read(path, labelled=True)
    cap = predictor.task.eval_cap()  # generation: decode the sample training evaluates on, not all of it
    if cap and len(dataset) > cap:
        dataset = Dataset(dataset.path, dataset.examples[:cap], extras=dataset.extras)
    return path, dataset


def _metrics(predictor: Any, directory: Path, dataset: Any) -> dict:
    """The task's metrics of the ONNX graphs in ``directory`` on ``dataset``."""
    runner = predictor.with_module(predictor.task.adopt(onnx_model(directory)))
    metrics = runner.evaluate(dataset)
    return {k: round(float(v), 6) for k, v in metrics.items() if isinstance(v, (int, float))}


def metric_lines(entry: dict) -> list[str]:
    """``fp32 dev.tsv: accuracy 0.8888, ...`` for each graph whose validation metrics ``entry`` holds."""
    from kiln.metrics import metrics_line

    lines = []
    for key, label in (("metrics_fp32", "fp32"), ("metrics_int8", "int8")):
        if key in entry:
            shown = metrics_line(entry[key])
            lines.append(f"{label:<5} {Path(entry['eval_data']).name} ({entry[key]['n']:g} examples): {shown}")
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
