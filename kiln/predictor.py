"""``kiln.load``: a trained model ready to predict and evaluate."""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import Any, TextIO

from kiln.config import coerce, config_from_dict, parse_override
from kiln.errors import KilnError
from kiln.files import read_json
from kiln.model_files import ADAPTER_CONFIG, KILN_FILE, KILN_KEYS, model_dir_of, verify_model_dir
from kiln.tasks import get_task
from kiln.tasks.base import Dataset, Task

log = logging.getLogger(__name__)


# On a CPU, larger inference batches spill their activations out of the caches: 4,096 tokens
# predicted bert-mini and MiniLM on SST-2 1.2x as fast as 16,384 (2-core Xeon, fp32).
CPU_BATCH_TOKENS = 4096


class Predictor:
    """A kiln-saved model (run directory or model directory) with its task and tokenizer.

    ``precision`` is ``fp32`` unless given (or set by ``KILN_PRECISION``): fp32 predictions agree
    with plain transformers; ``bf16`` or ``auto`` (the hardware's fast precision) trade that for speed.
    ``compile``: ``on`` runs the forward through ``torch.compile`` (``auto``: on CUDA only); where
    compiling fails the predictor says so once and runs eagerly. A directory ``kiln export`` wrote
    runs its ONNX graph with onnxruntime, on the CPU.

    Thread-safe: the shared task and config are never changed after loading (a call's own settings,
    ``parameters`` or ``columns``, go to a per-call copy), and inferences run one at a time, since
    the tokenizer and the model are shared and torch already uses every core for one.
    """

    def __init__(self, path: str | Path, device: str = "auto", precision: str | None = None,
                 batch_tokens: int | None = None, generate: list[str] | tuple[str, ...] = (),
                 compile: str = "off"):
        from kiln.export import is_onnx_export, onnx_model
        from kiln.tokenizers import load_tokenizer
        from kiln.training import compile as compiling
        from kiln.training.device import inference_precision, keep_freed_memory, resolve_device

        self.path = model_dir_of(path)
        meta_path = self.path / KILN_FILE
        if not meta_path.is_file():
            raise KilnError(f"no {KILN_FILE}: not a model kiln saved", self.path)
        self.runtime = "onnx" if is_onnx_export(self.path) else "torch"
        if self.runtime == "torch":
            verify_model_dir(self.path)  # every file, before any is loaded: a damaged one is one line
        self.meta = read_json(meta_path, required=KILN_KEYS)
        self.config = config_from_dict(self.meta["config"])
        for text in generate:  # decoding overrides (--generate key=value), e.g. num_beams=4
            key, value = parse_override(text)
            setattr(self.config.generate, key, coerce(f"generate.{key}", value))
        self.task = get_task(self.meta["task"], self.config, self.meta["task_state"])
        if generate and not any(key.startswith("generate.") for key in self.task.parameters().values()):
            raise KilnError(f"--generate sets how a model decodes, but this {self.task.name} model does not "
                            "generate (generation, clm and span models do)", self.path)
        self.tokenizer = load_tokenizer(self.path)
        self.task.bind(self.tokenizer)
        self.device = resolve_device(device)
        self.precision = inference_precision(precision, self.device)
        keep_freed_memory()
        self.module = None  # what runs the forward when not the task's module of the model: compiled, ONNX
        if self.runtime == "onnx":  # the graph is what it was exported as (fp32 or int8), on the CPU
            self.device, self.precision = resolve_device("cpu"), "fp32"
            self.model = self.module = self.task.adopt(onnx_model(self.path))
            self.task.forward_args = set(self.model.input_names)
        elif (self.path / ADAPTER_CONFIG).is_file():  # a LoRA run's checkpoint: its start, adapters merged
            from kiln.training.lora import merged_model

            self.model = merged_model(self.task, self.path, self.meta["lora"]).to(self.device).eval()
        else:
            self.model = self.task.load_model(self.path).to(self.device).eval()
            if compiling.wanted(compile, self.device, long_run=True):
                self.module = compiling.compile_module(self.task.training_module(self.model), self.device)
        self.max_length = int(self.meta["max_length"])
        self.batch_tokens = batch_tokens or self.config.train.batch_tokens * 2
        if not batch_tokens and self.device.type == "cpu":
            self.batch_tokens = min(self.batch_tokens, CPU_BATCH_TOKENS)
        self._inference = threading.Lock()
        log.debug(f"loaded {self.path} ({self.meta['task']}) on {self.device} in {self.precision}")

    def num_parameters(self) -> int:
        """The model's parameter count (an ONNX export states its model's)."""
        from kiln.models import count_parameters

        if self.runtime == "onnx":
            return int(self.meta["export"].get("num_parameters", 0))
        return count_parameters(self.model)

    def weights_precision(self) -> str:
        """What the model computes in, as shown to people: the inference precision, or an export's
        ``int8`` weights."""
        if self.runtime == "onnx" and self.meta["export"].get("quantize"):
            return str(self.meta["export"]["quantize"])
        return self.precision

    def with_module(self, module: Any) -> Predictor:
        """This predictor running ``module`` (another runtime of the same model, such as its ONNX
        graphs) for the forward and for ``generate()``, sharing everything else."""
        other = copy.copy(self)
        other.model = other.module = module
        other._inference = threading.Lock()
        return other

    def parameters(self) -> dict[str, Any]:
        """The task's per-call parameters (HF pipeline names) and the value each has without an override."""
        return {name: self.config.get(key) for name, key in self.task.parameters().items()}

    def check_parameters(self, parameters: dict[str, Any] | None) -> dict[str, Any]:
        """``parameters`` checked against the task's and converted to their settings' types (a
        KilnError naming the first that is unknown or out of range)."""
        allowed = self.task.parameters()
        checked = {}
        for name, value in (parameters or {}).items():
            if name not in allowed:
                known = ", ".join(sorted(allowed)) if allowed else "none"
                raise KilnError(f"unknown parameter '{name}' (this {self.task.name} model takes: {known})")
            checked[name] = coerce(allowed[name], value)
        return checked

    def _task_for(self, settings: dict[str, Any] | None = None) -> Task:
        """A per-call copy of the task, its config with ``settings`` (dotted key -> value) applied;
        the shared task and config stay as loaded, so other threads may use them meanwhile."""
        task = copy.copy(self.task)  # shares the read-only state, tokenizer and model facts
        if settings:
            task.config = self.config.with_settings(settings)
        return task

    def _task_with_parameters(self, parameters: dict[str, Any] | None) -> Task:
        allowed = self.task.parameters()
        checked = self.check_parameters(parameters)
        return self._task_for({allowed[name]: value for name, value in checked.items()})

    def _run(self, dataset: Dataset, task: Task | None = None) -> tuple[list[Any], float, int]:
        from kiln.training import compile as compiling
        from kiln.training.inference import run_inference

        task = task or self._task_for()
        with self._inference:
            features = task.encode(dataset, self.tokenizer, self.max_length)
            while True:
                try:
                    outputs, loss_sum, units = run_inference(
                        self.model, task, features, device=self.device, precision=self.precision,
                        batch_tokens=self.batch_tokens, max_batch_size=self.config.train.max_batch_size * 2,
                        pad_id=self.tokenizer.pad_token_id or 0, module=self.module)
                    break
                except Exception as error:
                    if self.module is None or not compiling.compile_failed(error):
                        raise
                    compiling.fall_back(error)
                    self.module = None
            return task.decode(outputs, features, dataset), loss_sum, units

    def read(self, path: str | Path, *, labelled: bool, stream: TextIO | None = None,
             columns: str | None = None) -> Dataset:
        """Read a data file with this model's task (and check its labels when ``labelled``);
        ``columns`` maps roles to columns for this file as ``data.columns`` does (``"text=3,label=1"``)."""
        task = self._task_for({"data.columns": columns} if columns is not None else None)
        dataset = task.read(path, labelled=labelled, stream=stream)
        if labelled:
            task.check(dataset)
        return dataset

    def predict(self, inputs: list[Any], parameters: dict[str, Any] | None = None) -> list[Any]:
        """Predict raw inputs (strings, or pairs for sentence-pair); HF-pipeline-style results, as
        ``kiln predict --json`` prints them. ``parameters`` override settings for this call only, by
        the names :meth:`parameters` lists (generation: ``{"num_beams": 4}``)."""
        task = self._task_with_parameters(parameters)
        dataset = Dataset("<input>", [task.parse_input(item, i + 1) for i, item in enumerate(inputs)])
        predictions, _, _ = self._run(dataset, task)
        return task.format(predictions, dataset)

    def predict_examples(self, examples: list[Any], parameters: dict[str, Any] | None = None) -> list[Any]:
        """:meth:`predict` for examples the task's ``parse_input`` already made (``kiln serve``
        parses each request as it arrives, then predicts a batch of them at once)."""
        task = self._task_with_parameters(parameters)
        dataset = Dataset("<input>", list(examples))
        predictions, _, _ = self._run(dataset, task)
        return task.format(predictions, dataset)

    def predict_dataset(self, dataset: Dataset, parameters: dict[str, Any] | None = None) -> list[Any]:
        """Task-level predictions for a dataset, in its order."""
        return self._run(dataset, self._task_with_parameters(parameters))[0]

    def evaluate(self, data: str | Path | Dataset) -> dict:
        """The task's metrics plus ``loss`` and ``n`` on a labelled file."""
        return self.evaluate_with_predictions(data)[0]

    def evaluate_with_predictions(self, data: str | Path | Dataset) -> tuple[dict, list[Any]]:
        """``(metrics, predictions)`` on a labelled file or dataset."""
        dataset = data if isinstance(data, Dataset) else self.read(data, labelled=True)
        predictions, loss_sum, units = self._run(dataset)
        metrics = self.task.metrics(predictions, dataset)
        metrics["loss"] = loss_sum / max(units, 1)
        metrics.update(self.task.loss_metrics(metrics["loss"]))
        metrics["n"] = len(dataset)
        return metrics, predictions


def load(path: str | Path, **kwargs: Any) -> Predictor:
    """Load a run directory (``runs/NAME``) or a model directory kiln saved."""
    return Predictor(path, **kwargs)
