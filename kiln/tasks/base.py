"""The Task interface: everything the shared loop needs to know about one kind of problem.

The loop never asks which task it runs; if a new task needs an ``if task == …`` in the loop, this
interface is missing a method. A task turns files into examples, examples into features (token
ids), features into padded batches, model outputs into losses and predictions, and predictions
into metrics and output files.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TextIO

from kiln.config import Config
from kiln.data.tables import Table

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Examples read from one file, with the table they came from (for writing predictions back)."""

    path: str
    examples: list[Any]
    table: Table | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)


LOWER_IS_BETTER = frozenset({"loss", "mse", "perplexity"})  # metrics whose best is the smallest


def pad_inputs(features: Sequence[dict], pad_id: int, per_token: dict[str, int] | None = None) -> dict:
    """Pad a micro-batch to its longest feature: ``input_ids``, ``attention_mask``,
    ``token_type_ids`` when present, and the ``per_token`` fields (name -> fill value)."""
    import numpy as np
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    fills = {"input_ids": pad_id, "token_type_ids": 0, **(per_token or {})}
    arrays = {key: np.full((len(features), longest), fill, dtype=np.int64)
              for key, fill in fills.items() if key in features[0]}
    attention = np.zeros((len(features), longest), dtype=np.int64)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        attention[row, :n] = 1
        for key, array in arrays.items():
            array[row, :n] = feature[key]
    batch = {key: torch.from_numpy(array) for key, array in arrays.items()}
    batch["attention_mask"] = torch.from_numpy(attention)
    return batch


# A demo example (kiln.json's "examples", the page's chips) stays readable in a text box.
EXAMPLE_CHARS = 300


def shorten(text: str, limit: int = EXAMPLE_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary (a long text, not a broken word)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit + 1)
    return text[:cut if cut > 0 else limit]


def generate_parameters() -> dict[str, str]:
    """Every decoding setting as a per-call parameter (``max_new_tokens`` -> ``generate.max_new_tokens``)."""
    from kiln.config import iter_settings

    return {key.split(".", 1)[1]: key for key, _ in iter_settings()
            if key.startswith("generate.") and key != "generate.eval_samples"}


@dataclass(frozen=True)
class Form:
    """One object form of an input item (``kiln serve``'s request, a JSONL line): its keys, and what the
    task's ``parse_input`` gets for it."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    word_list: str | None = None  # the key whose value is a list of strings (token: "tokens")
    convert: Callable[[dict], Any] | None = None  # None: the object itself

    @property
    def keys(self) -> tuple[str, ...]:
        return self.required + self.optional


class Features(list):
    """Token features with each one's token count for the batch sampler (``lengths``), for a task
    whose feature spreads its tokens over several sequences (candidates, sentences of a pair): the
    sampler's token budget then counts what the feature's part of a padded batch takes."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[int] = []

    @classmethod
    def grouped(cls, encoded: Any, sizes: Sequence[int], prefix: str) -> Features:
        """One feature per example from its run of consecutive tokenized sequences (``sizes``: how many
        each example has), as ``{prefix}input_ids`` (and token types) lists; its length is its count of
        sequences times the longest."""
        keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
        features = cls()
        start = 0
        for index, size in enumerate(sizes):
            feature: dict[str, Any] = {f"{prefix}{key}": encoded[key][start:start + size] for key in keys}
            feature["example"] = index
            features.append(feature)
            features.lengths.append(size * max(len(ids) for ids in feature[f"{prefix}input_ids"]))
            start += size
        return features


@dataclass(frozen=True)
class Route:
    """An endpoint a task adds to kiln serve besides ``/predict``, in the shape another server gives
    it (text-embeddings-inference's ``POST /embed``). ``inputs`` turns its JSON body into request
    items and per-call parameters, as ``/predict`` takes them (a KilnError: a 422 naming the field);
    ``answer`` turns the predictions and the body into its answer."""

    path: str
    summary: str
    inputs: Callable[[Any], tuple[list[Any], dict[str, Any]]]
    answer: Callable[[list[Any], Any], Any]


@dataclass
class CardFacts:
    """What the model card says of a task's model: the transformers class and pipeline that load it,
    its labels, and notes on using it."""

    auto_model: str
    pipeline_tag: str
    labels: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def config_labels(hf_config: dict) -> list[str]:
    """A classifier's labels in id order, from its ``config.json`` (none for a regression)."""
    if hf_config.get("problem_type") == "regression":
        return []
    id2label = hf_config.get("id2label", {})
    return [id2label[k] for k in sorted(id2label, key=int)]


class TaskProtocol(Protocol):
    """What every task implements itself, because no default can: ten methods, from reading a file to
    the JSON of a prediction (and either ``output_columns`` or ``write``). The rest of :class:`Task`
    are optional groups with defaults a task overrides when it needs to: the model (``build_model``,
    ``load_model``, ``model_kwargs``, ``training_module``, ``model_files``), splits and labels
    (``find_splits``, ``holdout``, ``fit``, ``check``, ``calibrate``), the demo's examples
    (``example_input``), per-call parameters (``parameters``), and the face the rest of kiln reads
    (class attributes). A task class missing one of the ten cannot be instantiated."""

    @abstractmethod
    def read(self, path: str | Path, *, labelled: bool = True, stream: TextIO | None = None) -> Dataset:
        """Read a data file; ``labelled=False`` accepts files without targets (predict)."""

    @abstractmethod
    def parse_input(self, item: Any, line: int) -> Any:
        """One unlabelled example from a stdin line or a Python value (str, tuple, dict)."""

    @abstractmethod
    def texts(self, dataset: Dataset) -> Iterator[str]:
        """Raw text for training a tokenizer."""

    @abstractmethod
    def encode(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        """Token features, one or more per example; each has ``input_ids`` and ``example`` (index)."""

    @abstractmethod
    def collate(self, features: Sequence[dict], pad_id: int) -> dict:
        """Pad a micro-batch to its longest member (never to a fixed maximum)."""

    @abstractmethod
    def loss(self, outputs: Any, batch: dict) -> Any:
        """The loss *summed* over the batch's loss units; the loop divides by the accumulated count."""

    @abstractmethod
    def loss_units(self, batch: dict) -> int:
        """How many loss terms a (CPU-side) batch contributes: examples, or unmasked tokens."""

    @abstractmethod
    def decode(self, outputs: list[Any], features: list[dict], dataset: Dataset) -> list[Any]:
        """Per-example predictions from per-feature outputs (both in dataset order)."""

    @abstractmethod
    def metrics(self, predictions: list[Any], dataset: Dataset) -> dict[str, float]:
        """The task's standard metrics against the dataset's labels."""

    @abstractmethod
    def format(self, predictions: list[Any], dataset: Dataset) -> list[Any]:
        """HF-pipeline-style JSON for ``predict --json``."""


REQUIRED = tuple(sorted(TaskProtocol.__abstractmethods__))


class Task(TaskProtocol):
    """Base class. Subclasses set the class attributes and implement the abstract methods.

    Besides the loop's methods, a task declares its face to the rest of kiln, so that no other
    module names tasks: ``pipeline_tag`` and :meth:`card_facts` (the model
    card), ``request_forms``, ``string_means`` and ``prediction_fields`` (kiln serve's schema),
    ``describer`` (kiln describe), and ``export_outputs`` or ``generates`` (kiln export).
    """

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    auto_model: ClassVar[str]  # transformers Auto class that loads the saved model/
    main_metric: ClassVar[str] = "loss"
    default_profile: ClassVar[str] = "bert-mini"  # used when neither --profile nor --init is given
    init_profile: ClassVar[str] = "_finetune"  # the recipe for a pretrained start (--init) without --profile
    pretraining: ClassVar[bool] = False  # trains on packed blocks of raw text (pretrain.seq_len tokens)
    tokenizer: Any = None  # given by bind(); tasks that decode text need it
    target_keys: ClassVar[tuple[str, ...]] = ("labels",)  # batch keys holding training targets
    outputs_need_forward: ClassVar[bool] = True  # False: unlabelled inference skips model.forward
    # Batches pad with the tokenizer's pad token, so a start without one (GPT-2) needs it set; the
    # generative tasks pad with the eos token themselves.
    needs_pad_token: ClassVar[bool] = True
    load_note: str | None = None  # what the last load_model initialised afresh (a new head), for the summary
    new_keys: tuple[str, ...] = ()  # the weights the last load_model initialised afresh (LoRA trains them whole)
    example_fields: ClassVar[tuple[str, ...]] = ()  # an example's text fields that make a request item
    pipeline_tag: ClassVar[str] = ""  # the Hugging Face pipeline that runs the model
    request_forms: ClassVar[tuple[Form, ...]] = ()  # object forms of an input, besides a string
    string_means: ClassVar[str] = "the text"  # what a plain string input is
    # The keys of one prediction and their types (None: not described); `per_input` "list": each input
    # gets a list of them (token: its entities).
    prediction_fields: ClassVar[dict[str, type] | None] = None
    predictions_per_input: ClassVar[str] = "one"
    describer: ClassVar[str] = "corpus"  # the kind of data `kiln describe` reads (kiln.describe.DESCRIBERS)
    export_outputs: ClassVar[tuple[str, ...]] = ()  # outputs of the one ONNX graph of an encoder task
    export_axes: ClassVar[tuple[str, ...]] = ("batch", "sequence")  # its inputs' axes, all dynamic
    generates: ClassVar[bool] = False  # predicts with generate(): exported as decoder (and encoder) graphs
    # How kiln serve's demo page asks for an input and shows a prediction (served in /info):
    # input "text" | "pair" | "question" (context + question) | "choices" (context, question, candidates)
    # | "source"; label: the text box's; hint "mask" | "sentinel" | "words" | "choices"; render "labels" |
    # "entities" | "answer" | "choice" | "fill-mask" | "generated" (else the JSON as it is).
    demo: ClassVar[dict[str, str]] = {"input": "text", "render": "json"}
    routes: ClassVar[tuple[Route, ...]] = ()  # kiln serve's endpoints besides /predict

    # The task's own settings: a dataclass of kiln.config.setting() fields, registered as the config
    # section `section` (-c qa.window=256, qa: in a YAML file); tasks that share settings share a section.
    settings_class: ClassVar[type | None] = None
    section: ClassVar[str] = ""

    def __init__(self, config: Config, state: dict | None = None):
        self.config = config
        self.state: dict = dict(state or {})

    @property
    def settings(self) -> Any:
        """This run's values of the task's own settings (its config section; None: it has none)."""
        return getattr(self.config, self.section) if self.section else None

    # -- reading -----------------------------------------------------------------------------
    def find_splits(self, data: str | Path) -> dict[str, Path]:
        """Map split names to files: a file is the train split; a directory holds ``train.*`` etc."""
        from kiln.data import find_splits

        return find_splits(data, self.suffixes)

    def eval_cap(self) -> int:
        """Evaluate on at most this many validation examples during training (0: all)."""
        return 0

    def holdout(self, train: Dataset) -> tuple[Dataset, Dataset]:
        """Split a training set without a validation file into ``(train, validation)``."""
        from kiln.data import holdout

        data = self.config.data
        kept, held = holdout(train.examples, data.validation_fraction, data.split_seed, group=self.group)
        return Dataset(train.path, kept, extras=train.extras), Dataset(train.path, held, extras=train.extras)

    def group(self, example: Any) -> Any:
        """Hold-out unit for splitting one file 90/10 (``None``: each example on its own)."""
        return None

    def fit(self, train: Dataset) -> None:
        """Learn what the training data defines (label set, problem type) into ``self.state``."""

    def check(self, dataset: Dataset) -> None:
        """Reject evaluation data that does not fit the trained state (e.g. unseen labels)."""

    def example_inputs(self, dataset: Dataset, count: int = 5) -> list[Any]:
        """Up to ``count`` distinct request items (:meth:`example_input`) from ``dataset``, spread over
        it, deterministic: the examples a saved model offers (``kiln.json``'s ``examples``)."""
        import json

        found: list[Any] = []
        seen: set[str] = set()
        for example in self.example_candidates(dataset, count):
            item = self.example_input(example)
            key = json.dumps(item, sort_keys=True, ensure_ascii=False)  # also proves it is JSON
            if item is None or key in seen:
                continue
            seen.add(key)
            found.append(item)
            if len(found) == count:
                break
        return found

    def example_candidates(self, dataset: Dataset, count: int) -> Iterator[Any]:
        """Examples to take :meth:`example_inputs` from: ``count`` spread evenly over the dataset first
        (different labels and articles rather than the first few rows), then all in order, for
        when some of those make no item."""
        examples = dataset.examples
        yield from (examples[i * len(examples) // count] for i in range(min(count, len(examples))))
        yield from examples

    def example_input(self, example: Any) -> Any:
        """``example`` as a request item of ``kiln serve``'s ``/predict`` (a form :meth:`parse_input`
        takes), shortened for a demo; None when it makes none (a blank text).

        Default: the example's ``example_fields``, cut to :data:`EXAMPLE_CHARS`; a single field is a
        plain string, several are an object keyed by field name."""
        texts = {key: example.get(key) for key in self.example_fields} if isinstance(example, dict) else {}
        if not texts or not all(isinstance(text, str) and text.strip() for text in texts.values()):
            return None
        shortened = {key: shorten(str(text)) for key, text in texts.items()}
        return next(iter(shortened.values())) if len(shortened) == 1 else shortened

    def parameters(self) -> dict[str, str]:
        """Per-call prediction parameters (``kiln serve``'s ``parameters``, HF pipeline names) and the
        setting each one overrides, e.g. ``{"num_beams": "generate.num_beams"}``."""
        return {}

    # -- model -------------------------------------------------------------------------------
    def model_kwargs(self) -> dict:
        """Extra HF config keys for the head (labels, problem type)."""
        return {}

    def build_model(self, hf_config: Any) -> Any:
        """A fresh model with random weights for ``hf_config``."""
        import transformers

        from kiln.models import quiet_transformers

        quiet_transformers()
        return self._accepting(getattr(transformers, self.auto_model).from_config(hf_config))

    def load_model(self, path: str | Path, **kwargs: Any) -> Any:
        """Load a local HF checkpoint for this task (its files checked first: a damaged one is a
        KilnError naming it)."""
        import transformers

        from kiln.model_files import verify_model_dir
        from kiln.models import quiet_transformers

        verify_model_dir(Path(path))
        quiet_transformers()
        # transformers reports new and unused weights as a multi-line table; kiln says it in one line.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            model, info = getattr(transformers, self.auto_model).from_pretrained(
                path, local_files_only=True, output_loading_info=True, **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
        new = sorted({*info.get("missing_keys", ()), *(key for key, *_ in info.get("mismatched_keys", ()))})
        self.new_keys = tuple(new)
        self.load_note = (f"{self.head_description(model)}, {len(new)} tensors initialised at random "
                          f"({', '.join(new[:4])}{', …' if len(new) > 4 else ''})") if new else None
        return self._accepting(model)

    def head_description(self, model: Any) -> str:
        """What a fresh head on a pretrained body is, in a few words, for the start-of-run line."""
        return "new weights"

    def _accepting(self, model: Any) -> Any:
        """Remember which inputs ``model.forward`` takes (DistilBERT has no token_type_ids), and keep
        the modules transformers gets wrong in bf16/fp16 in fp32 (:func:`kiln.models.keep_in_fp32`)."""
        import inspect

        from kiln.models import keep_in_fp32

        self.forward_args = set(inspect.signature(model.forward).parameters)
        keep_in_fp32(model)
        return model

    @classmethod
    def card_facts(cls, hf_config: dict) -> CardFacts:
        """The model card's facts for a saved model whose ``config.json`` is ``hf_config``."""
        return CardFacts(cls.auto_model, cls.pipeline_tag)

    def model_files(self) -> dict[str, str]:
        """Files every saved model directory carries besides transformers' own (relative path -> text),
        e.g. the sentence-transformers modules that make it load there too."""
        return {}

    def adopt(self, model: Any) -> Any:
        """Take what the task needs from a model loaded elsewhere than :meth:`load_model` (an ONNX
        export's runtime), as loading would; returns ``model``."""
        return model

    def bind(self, tokenizer: Any) -> None:
        """Give the task the tokenizer it works with. Whatever a task derives from the tokenizer
        (special token ids, the vocabulary size) it derives here, once, rather than as a side effect
        of encoding."""
        self.tokenizer = tokenizer

    def training_module(self, model: Any) -> Any:
        """The module the loop calls with :meth:`model_inputs` (default: the model itself).

        A task can wrap the model here (e.g. a sparse MLM head); the wrapper shares its parameters,
        so the HF model is still what is saved and exported."""
        return model

    def training_order(self, features: Any) -> Any:
        """A fixed order of the training features (a curriculum), or None to shuffle each epoch."""
        return None

    # -- features and batches ----------------------------------------------------------------
    def collate_training(self, features: Sequence[dict], pad_id: int, epoch: int) -> dict:
        """:meth:`collate` for a training micro-batch of ``epoch`` (tasks that draw noise per
        batch, like masking, vary it by epoch here)."""
        return self.collate(features, pad_id)

    def model_inputs(self, batch: dict) -> dict:
        """The part of a batch the model's ``forward`` takes."""
        accepted = getattr(self, "forward_args", None)
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
                and (accepted is None or k in accepted)}

    def outputs(self, outputs: Any, batch: dict, model: Any = None) -> list[Any]:
        """Per-feature outputs (numpy) kept for decoding, in batch order."""
        logits = outputs.logits.float().cpu().numpy()
        return list(logits)

    # -- predictions and metrics -------------------------------------------------------------
    @property
    def long_inputs(self) -> str:
        """What training does with an input longer than the model's limit, for kiln describe."""
        return ""

    def calibrate(self, predictions: list[Any], dataset: Dataset) -> None:
        """Learn from the validation predictions what decoding uses (multi-label thresholds) into
        ``self.state``; the loop calls it at each evaluation, before :meth:`metrics`, so the best
        checkpoint keeps what its own evaluation learnt. Default: nothing."""

    def notes(self) -> list[str]:
        """Lines the start-of-run summary shows about what :meth:`fit` saw (the label distribution)."""
        return []

    def loss_metrics(self, loss: float) -> dict[str, float]:
        """Metrics derived from the mean validation loss (perplexity for language tasks)."""
        return {}

    def metric_names(self) -> list[str]:
        """What :meth:`metrics` and :meth:`loss_metrics` report, with ``loss``: ``train.metric`` is
        checked against them before training rather than at the first evaluation."""
        return ["loss", *self.loss_metrics(1.0)]

    def greater_is_better(self, metric: str) -> bool:
        """Direction of a metric, for best-checkpoint selection and early stopping: for the metric that
        picks the checkpoint, ``train.greater_is_better`` when it is set; else from the metric's name."""
        given = self.config.train.greater_is_better
        if given is not None and metric == (self.config.train.metric or self.main_metric):
            return bool(given)
        return metric not in LOWER_IS_BETTER

    def write(self, dataset: Dataset, predictions: list[Any], stream: TextIO) -> None:
        """Write predictions in the input's own format (a column or fields appended)."""
        from kiln.data.tables import write_table

        if dataset.table is None:
            raise ValueError(f"{dataset.path}: no table to write predictions into")  # a kiln bug, not input
        write_table(dataset.table, self.output_columns(predictions, dataset.table.format), stream)

    def output_columns(self, predictions: list[Any], fmt: str) -> dict[str, list[Any]]:
        """Columns (TSV/CSV) or fields (JSONL) that :meth:`write` appends to a table."""
        raise NotImplementedError
