"""Typed configuration. Every setting is declared once, here: its default and its doc.

The YAML key (``section.field``), the ``-c section.field=value`` override, the CLI flag (for the
fields that have one) and the ``--help`` text are all derived from these declarations.

Values are merged in layers, and ``--print-config`` shows which layer each value came from:
``default`` < ``profile`` (a shipped profile) < ``file`` (a user's YAML) < ``flag`` (CLI flags and ``-c``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError


def setting(default: Any, doc: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
            minimum: float | None = None, above: float | None = None, maximum: float | None = None,
            parse: Any = None, resumable: bool = False) -> Any:
    """Declare a config field: its default, its one-line doc and, optionally, its CLI flag, its
    choices, its range (``minimum`` <= value, ``above`` < value, value <= ``maximum``), a
    ``parse`` function that must accept the value (e.g. a duration), and whether ``--resume`` may
    change it (``resumable``: how long to train and how to save and report, never what is computed)."""
    metadata = {"doc": doc, "flag": flag, "choices": choices, "minimum": minimum, "above": above,
                "maximum": maximum, "parse": parse, "resumable": resumable}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def parse_duration(text: str) -> float:
    """Seconds in ``45m``, ``2h``, ``1d``, ``90s``, ``1h30m`` or a bare number of seconds (empty: 0)."""
    import re

    text = str(text).strip().lower()
    if not text:
        return 0.0
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text):
        raise KilnError(f"cannot read the duration '{text}' (use e.g. 45m, 2h, 1d, 1h30m)")
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in parts)


def parse_save_every(text: str) -> tuple[int, float]:
    """``(steps, seconds)`` of a ``save_every`` value: ``500`` is steps, ``10m`` is wall-clock time."""
    text = str(text).strip()
    if not text:
        return 0, 0.0
    if text.isdigit():
        if int(text) < 1:
            raise KilnError("save_every must be at least 1 step")
        return int(text), 0.0
    forms = "a whole number of steps (500) or a duration with its unit (90s, 10m, 1h)"
    if not any(unit in text.lower() for unit in "dhms"):  # 1.5, -5: neither steps nor a duration
        raise KilnError(f"save_every takes {forms}, not '{text}'")
    try:
        seconds = parse_duration(text)
    except KilnError:
        raise KilnError(f"save_every takes {forms}, not '{text}'") from None
    if seconds <= 0:
        raise KilnError(f"save_every must be a positive duration, not '{text}'")
    return 0, seconds


REPORTERS = ("tensorboard", "mlflow")
COMPILE_CHOICES = ("auto", "on", "off")


def parse_report_to(text: str) -> list[str]:
    """The trackers named in ``report_to`` (``none`` and empty: no tracker)."""
    names = [name.strip().lower() for name in str(text).split(",") if name.strip()]
    if names in ([], ["none"]):
        return []
    unknown = [name for name in names if name not in REPORTERS]
    if unknown:
        raise KilnError(f"unknown tracker '{unknown[0]}' (choose from {', '.join(REPORTERS)} or none)")
    return names


@dataclass
class ModelConfig:
    """The architecture built for a from-scratch run."""

    type: str = setting("bert", "Hugging Face model_type, as in config.json.")
    config: dict = setting({}, "Keyword arguments for transformers.AutoConfig.for_model (architecture).")


@dataclass
class TokenizerConfig:
    """The tokenizer trained on the training split when no --init or --tokenizer is given."""

    kind: str = setting("wordpiece", "Tokenizer model to train.", choices=("wordpiece", "bpe", "unigram"))
    style: str = setting(
        "bert", "Special tokens and template: bert ([CLS] a [SEP]), roberta (<s> a </s>), t5 (a </s>), "
        "mbart (a </s>, language codes) or gpt2 (<|endoftext|> only).",
        choices=("bert", "roberta", "t5", "mbart", "gpt2"),
    )
    vocab_size: int = setting(30522, "Vocabulary size (capped for small training sets unless pinned).", minimum=8)
    pin_vocab: bool = setting(False, "Use vocab_size exactly, without capping it for small data.")
    lowercase: bool = setting(True, "Lowercase text before tokenizing (uncased models).")
    min_frequency: int = setting(2, "Minimum pair/word frequency for a merge or vocabulary entry.", minimum=0)


# The optimizers kiln trains with (kiln.training.optim builds each; kiln estimate sizes each one's state).
OPTIMIZERS = ("adamw", "adam", "adafactor", "radam")


@dataclass
class OptimConfig:
    """The optimizer. Bias and LayerNorm weights never get weight decay."""

    name: str = setting("adamw", "Optimizer.", choices=OPTIMIZERS)
    lr: float = setting(5e-5, "Peak learning rate.", flag="--lr", minimum=0)
    betas: list = setting([0.9, 0.999], "Adam betas.")
    eps: float = setting(1e-8, "Adam epsilon.", minimum=0)
    weight_decay: float = setting(0.01, "Decoupled weight decay (AdamW) or L2 (others).", minimum=0)


@dataclass
class ScheduleConfig:
    """The learning-rate schedule, a multiplier of optim.lr per optimizer step."""

    name: str = setting(
        "linear", "Schedule after warmup; budget-triangle is cramming's min(0.25 + x, 4 - 4x) of the "
        "elapsed fraction x (no warmup).",
        choices=("linear", "cosine", "constant", "inverse_sqrt", "budget-triangle"),
    )
    warmup_ratio: float = setting(0.06, "Warmup as a fraction of all steps (used when warmup_steps is 0).",
                                 minimum=0, maximum=1)
    warmup_steps: int = setting(0, "Warmup steps; overrides warmup_ratio when > 0.", minimum=0)


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: float = setting(3, "Epochs to train (fractions allowed; 0 with max_steps or a budget).",
                            flag="--epochs", minimum=0, resumable=True)
    max_steps: int = setting(0, "Stop after this many optimizer steps (0: use epochs).", flag="--max-steps",
                             minimum=0, resumable=True)
    budget: str = setting(
        "", "Wall-clock training budget, e.g. 45m, 2h, 1d: train until it is spent (epochs are then "
        "ignored); the LR schedule and batch ramp follow the elapsed fraction of it (or of max_steps, "
        "whichever ends first).", flag="--budget", parse=parse_duration, resumable=True,
    )
    batch_ramp: float = setting(
        0.0, "Grow gradient accumulation linearly from 1 to grad_accum until this fraction of training "
        "(0: off; cramming: 0.6).", minimum=0, maximum=1,
    )
    batch_tokens: int = setting(
        8192, "Token budget per micro-batch, padding included (length-bucketed batches).",
        flag="--batch-tokens", minimum=1,
    )
    batch_size: int = setting(
        0, "Fixed examples per micro-batch instead of a token budget (0: use batch_tokens).",
        flag="--batch-size", minimum=0,
    )
    max_batch_size: int = setting(256, "Upper bound on examples in one token-budget micro-batch.", minimum=1)
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", flag="--grad-accum", minimum=1)
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this (0: off).", minimum=0)
    dropout: float | None = setting(None, "Override the model's dropout probabilities (null: keep).",
                                   minimum=0, maximum=1)
    max_length: int = setting(512, "Truncate inputs to this many tokens (capped by the model).", minimum=1)
    precision: str = setting(
        "auto", "Compute precision; auto picks bf16 on CUDA and on CPUs with native bf16 (AMX, "
        "AVX512-BF16), else fp32.", flag="--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    device: str = setting("auto", "Device: auto, cpu, cuda or cuda:N.", flag="--device", resumable=True)
    compile: str = setting(
        "auto", "torch.compile the model (inductor): on, off, or auto (CUDA runs of at least 300 steps or a "
        "10m budget; on CPUs it measured no faster). Without a C++ compiler (CPU) or triton (CUDA): eager, "
        "said once.",
        flag="--compile", choices=COMPILE_CHOICES, resumable=True)
    seed: int = setting(42, "Random seed for init, shuffling and dropout.", flag="--seed")
    eval_every: int = setting(0, "Evaluate every N optimizer steps (0: once per epoch).", flag="--eval-every",
                              minimum=0)
    patience: int = setting(0, "Stop after N evaluations without improvement (0: never).", flag="--patience",
                            minimum=0, resumable=True)
    metric: str = setting("", "Metric that picks the best checkpoint and drives early stopping (empty: the task's "
                              "main metric; e.g. macro_f1, mcc, f1/LABEL).", flag="--metric")
    greater_is_better: bool | None = setting(
        None, "Whether a larger train.metric is better (null: from its name: loss, mse and perplexity are "
        "better smaller).")
    log_every: int = setting(50, "Write a metrics.jsonl line every N optimizer steps.", minimum=1,
                             resumable=True)
    keep_checkpoints: bool = setting(True, "Keep checkpoints/ after training (model/ is always written).",
                                     resumable=True)
    save_every: str = setting(
        "", "Also checkpoint every N optimizer steps ('500') or every span of wall-clock time ('10m'); "
        "empty: at evaluations only.", flag="--save-every", parse=parse_save_every, resumable=True)
    keep_last: int = setting(1, "Checkpoints kept besides the best one (the newest K).", flag="--keep-last",
                             minimum=1, resumable=True)
    nonfinite_limit: int = setting(
        10, "Stop (with a resumable checkpoint) after this many consecutive steps whose loss or gradient "
        "was not finite; each such step is skipped, not applied.", minimum=1)
    auto_batch: bool = setting(
        False, "On CUDA out-of-memory, split each micro-batch in two and retry (the effective batch stays).",
        flag="--auto-batch")
    grad_checkpoint: bool = setting(
        False, "Activation checkpointing: recompute activations in the backward pass to save memory.",
        flag="--grad-checkpoint")
    fsdp: str = setting(
        "", "Shard with FSDP2 (several processes): full (parameters, gradients and optimizer state; "
        "ZeRO-3), grad-op (gradients and optimizer state; ZeRO-2) or hybrid (full within a node, "
        "replicated across nodes); empty: DDP.", flag="--fsdp", choices=("", "full", "grad-op", "hybrid"))
    cpu_offload: bool = setting(False, "FSDP: keep sharded parameters and optimizer state in CPU memory.",
                                flag="--cpu-offload")
    dist_timeout: str = setting(
        "30m", "Several processes: how long a rank waits for the others in a collective before the job "
        "fails (a stuck or lost peer then ends the job instead of hanging it); e.g. 10m, 1h.",
        flag="--dist-timeout", parse=parse_duration, resumable=True)
    report_to: str = setting(
        "none", "Trackers to report to, comma-separated: tensorboard, mlflow (or none).", flag="--report-to",
        parse=parse_report_to, resumable=True)


@dataclass
class DataConfig:
    """How training data is read (what every task shares; a task's own settings are its section)."""

    columns: str = setting(
        "", "Map roles to columns by header name or 0-based position, e.g. 'text=3,label=1'.",
        flag="--columns",
    )
    validation_fraction: float = setting(0.1, "Held-out fraction when DATA has no validation split.",
                                        minimum=0, maximum=0.9)
    split_seed: int = setting(13, "Seed of the deterministic train/validation split.")


@dataclass
class GenerateConfig:
    """Decoding for the generation task (transformers ``generate()``); ``--generate key=value`` overrides."""

    max_new_tokens: int = setting(64, "Longest output, in tokens.", minimum=1, maximum=100_000)
    num_beams: int = setting(1, "Beam width (1: greedy or sampling).", minimum=1, maximum=64)
    length_penalty: float = setting(1.0, "Beam search length penalty (the score is divided by length ** this).",
                                    minimum=-10, maximum=10)  # a long output's length ** 100 overflows
    no_repeat_ngram_size: int = setting(0, "Never repeat an n-gram of this size (0: off).", minimum=0)
    do_sample: bool = setting(False, "Sample instead of greedy/beam search.")
    temperature: float = setting(1.0, "Sampling temperature.", above=0)  # transformers refuses 0
    top_k: int = setting(50, "Sample from the k most likely tokens.", minimum=0)
    top_p: float = setting(1.0, "Sample from the smallest set with this much probability.", above=0, maximum=1)
    seed: int = setting(0, "Seed for reproducible sampling.", minimum=0, maximum=2**63 - 1)  # torch's range
    return_full_text: bool = setting(
        True, "Decoder-only (clm) predict: the answer starts with the prompt, as the text-generation pipeline's.")
    eval_samples: int = setting(500, "Validation examples decoded at each evaluation during training.", minimum=1)


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, through peft): the pretrained start stays frozen and only small added
    matrices and the task's new head train; ``--lora [KEY=VALUE,...]`` sets these."""

    r: int = setting(0, "LoRA rank: train rank-r adapters on a frozen --init start (0: full fine-tuning; "
                        "the --lora flag alone: 8).", minimum=0, maximum=4096)
    alpha: float = setting(16.0, "LoRA scaling numerator: the adapters' update is scaled by alpha / r.", above=0)
    dropout: float = setting(0.05, "Dropout on the adapters' input.", minimum=0, maximum=1)
    targets: str = setting("", "Modules to adapt, comma-separated names (e.g. query,value); empty: the family's "
                               "attention projections, as peft chooses.")
    lr: float = setting(5e-4, "Peak learning rate of a LoRA run unless --lr (or -c optim.lr) sets one: adapters "
                              "start at zero and take larger steps than full fine-tuning.", above=0)


LORA_RANK = 8  # what --lora alone means


@dataclass
class DistillConfig:
    """Distillation (``kiln distill``): the student learns from a trained teacher's softened outputs
    as well as from the labels."""

    teacher: str = setting("", "The teacher: a kiln run (or its model directory) of the same task; empty: no "
                               "distillation.")
    temperature: float = setting(2.0, "Softens both distributions before they are compared (the soft loss is "
                                      "scaled by its square, as in Hinton et al.).", flag="--temperature", above=0)
    alpha: float = setting(0.5, "Weight of the teacher's soft targets; 1 - alpha goes to the labels.",
                           flag="--alpha", minimum=0, maximum=1)
    unlabeled: str = setting("", "A file of unlabelled inputs (the task's format, no label) that the teacher "
                                 "labels for the student: more data where labels are few.", flag="--unlabeled")
    augment: int = setting(4, "Perturbed copies of each training input (words masked, n-grams sampled, as in Tang "
                              "et al. 2019) that the teacher labels for the student: more inputs to learn the "
                              "teacher from.", flag="--augment", minimum=0)
    student_init: str = setting(
        "teacher", "How a student without --init starts: 'teacher', from evenly spaced layers, heads and dimensions "
                   "of the teacher (same model family, no larger than it; else random, and the summary says why), "
                   "or 'random'.", flag="--student-init", choices=("teacher", "random"))


def parse_lora(spec: str | None) -> list[str]:
    """``-c`` overrides for a ``--lora`` value: ``r=8,alpha=16,dropout=0.05,targets=query,value`` (a
    bare word continues the previous key's list, as targets above); empty: rank 8 on the defaults."""
    pairs: list[list[str]] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if "=" in part:
            key, _, value = part.partition("=")
            pairs.append([key.strip(), value.strip()])
        elif part and pairs:
            pairs[-1][1] += "," + part
        elif part:
            raise KilnError(f"--lora takes KEY=VALUE pairs (r=8,alpha=16,dropout=0.05,targets=query,value), "
                            f"not '{part}'")
    names = [f.name for f in dataclasses.fields(LoraConfig)]
    unknown = [key for key, _ in pairs if key not in names]
    if unknown:
        raise KilnError(f"--lora has no key '{unknown[0]}' (it takes {', '.join(names)})")
    settings = dict(pairs)
    settings.setdefault("r", str(LORA_RANK))
    return [f"lora.{key}={value}" for key, value in settings.items()]


@dataclass
class Config:
    """A profile (architecture + recipe) merged with the user's overrides."""

    name: str = setting("custom", "Profile name.")
    family: str = setting("custom", "Model family, for the profiles table.")
    description: str = setting("", "One-line description.")
    tasks: list = setting(["sequence", "sentence-pair"], "Tasks this profile supports.")
    params: int = setting(0, "Parameter count of the released base model this profile mirrors.")
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # The tasks' own sections (qa, token, pretrain...) by name, read as attributes: config.qa.window.
    task_settings: dict[str, Any] = field(default_factory=lambda: {
        name: owner() for name, owner in task_sections().items()})

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("task_settings") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"'Config' has no section or setting '{name}'")

    def to_dict(self) -> dict:
        """Plain nested dict, ready for YAML: the tasks' sections sit beside the shared ones."""
        tree = dataclasses.asdict(self)
        tree.update(tree.pop("task_settings"))
        return tree

    def get(self, key: str) -> Any:
        """The value of a dotted setting (``generate.num_beams``)."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        return value

    def with_settings(self, settings: dict[str, Any]) -> Config:
        """A copy with ``settings`` (dotted keys, values already checked) applied; only the sections
        they touch are copied, and this config is untouched (a per-call copy for concurrent use)."""
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        moved = moved_keys()
        for key, value in settings.items():
            section, _, name = moved.get(key, key).partition(".")
            if name:
                sections.setdefault(section, {})[name] = value
            else:
                top[section] = value
        task_settings = dict(self.task_settings)
        for section, values in sections.items():
            if section in task_settings:
                task_settings[section] = dataclasses.replace(task_settings[section], **values)
            else:
                top[section] = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **top, task_settings=task_settings)


# The shared sections, declared above; each task declares its own (kiln.tasks registers them).
SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else globals()[f.type]
    for f in dataclasses.fields(Config)
    if f.name in {"model", "tokenizer", "optim", "schedule", "train", "data", "generate", "lora", "distill"}
}

# Providers of the tasks' sections. kiln.tasks registers one when it is imported (kiln/__init__ imports
# it), and it is asked the first time the schema is needed, so `kiln --help` imports no task module.
_PROVIDERS: list[Callable[[], Mapping[str, type]]] = []
_task_sections: dict[str, type] = {}
_moved: dict[str, str] = {}  # derived from _task_sections, with it


def register_sections(provider: Callable[[], Mapping[str, type]]) -> None:
    """Add a provider of settings sections (name -> dataclass of :func:`setting` fields), asked once."""
    _PROVIDERS.append(provider)
    _task_sections.clear()
    _moved.clear()


def task_sections() -> dict[str, type]:
    """The sections the tasks declare for their own settings (``qa``, ``token``...), by name."""
    if not _task_sections:
        for provider in _PROVIDERS:
            _task_sections.update(provider())
        _moved.update({old: f"{name}.{field}" for name, owner in _task_sections.items()
                       for field, old in getattr(owner, "formerly", {}).items()})
    return _task_sections


def sections() -> dict[str, type]:
    """Every settings section, the shared ones first."""
    return {**SECTIONS, **task_sections()}


def moved_keys() -> dict[str, str]:
    """Older spellings of settings that moved into a task's section (``data.window`` -> ``qa.window``):
    a section's ``formerly`` maps each moved field to its old key. Saved runs, YAML files and ``-c``
    still take them."""
    task_sections()  # computes them once, with the sections
    return _moved


def iter_settings() -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """Yield ``(dotted_key, field)`` for every leaf setting."""
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            for sub in dataclasses.fields(SECTIONS[f.name]):
                yield f"{f.name}.{sub.name}", sub
        elif f.name != "task_settings":
            yield f.name, f
    for name, owner in task_sections().items():
        for sub in dataclasses.fields(owner):
            yield f"{name}.{sub.name}", sub


def setting_type(key: str) -> Any:
    """The declared type of the dotted setting ``key`` (``int``, ``float | None``...)."""
    owner = sections()[key.split(".")[0]] if "." in key else Config
    return typing.get_type_hints(owner)[key.rsplit(".", 1)[-1]]


def coerce(key: str, value: Any, where: str = "", ranges: bool = True) -> Any:
    """Check and convert ``value`` to the declared type of setting ``key`` (and, with ``ranges``,
    against its declared range and parser)."""
    fields = dict(iter_settings())
    key = moved_keys().get(key, key)
    if key not in fields:
        # The right name in the wrong section (train.lr) is the likeliest slip: suggest the
        # settings with that leaf name; difflib on the whole key would offer train.metric.
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in fields if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(key, fields, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KilnError(f"unknown setting '{key}'{hint}", where or None)
    f = fields[key]
    declared = setting_type(key)
    allowed = typing.get_args(declared) if isinstance(declared, types.UnionType) else (declared,)
    if value is None:
        if type(None) in allowed:
            return None
        raise KilnError(f"setting '{key}' cannot be null", where or None)
    for kind in allowed:
        if kind is type(None):
            continue
        kind = typing.get_origin(kind) or kind
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):  # nan passes every range check, inf most
                raise KilnError(f"setting '{key}' must be a finite number, not {value}", where or None)
        elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `-c train.budget=90`: YAML read the text as a number
        elif kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif kind is list and isinstance(value, tuple):
            value = list(value)
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            _check(key, value, f.metadata, where, ranges)
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed if k is not type(None))
    raise KilnError(f"setting '{key}' expects {names}, got {value!r}", where or None)


def check_declared(key: str, value: Any, declared: dataclasses.Field) -> None:
    """Check a typed value against the choices, range and parser a :func:`setting` declares, for
    settings declared outside :class:`Config` (``kiln serve``'s); ``key`` names it in the error."""
    _check(key, value, declared.metadata, "")


def _check(key: str, value: Any, meta: Mapping[str, Any], where: str, ranges: bool = True) -> None:
    """A typed value against its declared choices, range and parser."""
    choices = meta.get("choices")
    if choices and value not in choices:
        raise KilnError(f"setting '{key}' must be one of {', '.join(choices)}, got '{value}'", where or None)
    if not ranges:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, above, high = meta.get("minimum"), meta.get("above"), meta.get("maximum")
        problem = (f"at least {low}" if low is not None and value < low else
                   f"above {above}" if above is not None and value <= above else
                   f"at most {high}" if high is not None and value > high else None)
        if problem:
            raise KilnError(f"setting '{key}' must be {problem}, got {value}", where or None)
    if meta.get("parse") and value:
        try:
            meta["parse"](value)
        except KilnError as err:
            raise KilnError(f"setting '{key}': {err.message}", where or None) from None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}} -> {"optim.lr": 1}``; ``model.config`` stays one dict-valued leaf."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in sections():
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


class ConfigBuilder:
    """Merges layers of settings and remembers where each value came from."""

    def __init__(self, ranges: bool = True) -> None:
        self.ranges = ranges  # off for a saved run's config: it trained (or loads) as it was
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        for key, f in iter_settings():
            factory: Any = f.default_factory
            default = factory() if f.default is dataclasses.MISSING else f.default
            self.values[key] = default
            self.sources[key] = "default"

    def apply(self, tree: dict, source: str, where: str = "",
              lines: Callable[[], dict[str, int]] | None = None) -> None:
        """Overlay a nested mapping (profile, YAML file); ``lines()`` locates its keys when one of
        them is an error (asked only then: it parses the file again)."""
        for key, value in flatten(tree).items():
            try:
                self.set(key, value, source, where)
            except KilnError as err:
                if lines and err.line is None:
                    err.line = lines().get(key)
                raise

    def set(self, key: str, value: Any, source: str, where: str = "") -> None:
        """Set one dotted key. ``model.config.X`` updates one architecture entry."""
        if key.startswith("model.config."):
            sub = key.removeprefix("model.config.")
            self.values["model.config"] = {**self.values["model.config"], sub: value}
            self.sources[key] = source
            return
        key = moved_keys().get(key, key)
        value = coerce(key, value, where, self.ranges)
        if key == "model.config":
            for sub in value:
                self.sources[f"model.config.{sub}"] = source
            value = {**self.values["model.config"], **value}
        self.values[key] = value
        self.sources[key] = source

    def build(self) -> Config:
        """Materialise the typed :class:`Config`."""
        values: dict[str, dict] = {name: {} for name in sections()}
        top: dict[str, Any] = {}
        for key, value in self.values.items():
            if "." in key:
                section, name = key.split(".", 1)
                values[section][name] = value
            else:
                top[key] = value
        built = {name: owner(**values[name]) for name, owner in sections().items()}
        return Config(**top, **{name: built[name] for name in SECTIONS},
                      task_settings={name: built[name] for name in task_sections()})

    def described(self) -> list[tuple[str, Any, str]]:
        """Rows of ``(key, value, source)`` for ``--print-config``."""
        rows = []
        for key, value in self.values.items():
            if key == "model.config":
                for sub, sub_value in value.items():
                    rows.append((f"{key}.{sub}", sub_value, self.sources.get(f"{key}.{sub}", "profile")))
            else:
                rows.append((key, value, self.sources[key]))
        return rows


# YAML 1.2 floats: PyYAML follows YAML 1.1, where `1e-4` and `3E-5` (no dot) are strings.
_FLOAT = "|".join([
    r"[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?",  # 1.5, 1.0e+3
    r"[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?",  # .5
    r"[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+",  # 1e-4
    r"[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
])


@functools.cache
def yaml_loader() -> Any:
    """PyYAML's SafeLoader, reading YAML 1.2 numbers (see :func:`load_yaml`)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # YAML 1.2's numbers: drop 1.1's int and float resolvers, which read 1e-4 as text and 1:30 as 90
    # (base 60) or 010 as 8, and add 1.2's.
    numbers = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
    Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] not in numbers]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+)$"),
                                 list("-+0123456789"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(f"^(?:{_FLOAT})$"), list("-+0123456789."))
    return Loader


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 numbers: ``1e-4`` is a number, as in JSON and Python, and
    ``1:30`` is text (YAML 1.1 read it as 90)."""
    import yaml

    return yaml.load(text, Loader=yaml_loader())  # a SafeLoader subclass: no arbitrary objects


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``-c key=value``; the value is read as YAML so numbers, lists and nulls work."""
    import yaml

    if "=" not in text:
        raise KilnError(f"-c expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resumable_keys() -> list[str]:
    """The settings ``--resume`` may change (declared ``resumable``)."""
    return [key for key, f in iter_settings() if f.metadata.get("resumable")]


def changed_settings(before: dict, after: dict, *, resumable: bool = False) -> list[tuple[str, Any, Any]]:
    """``(key, before, after)`` for each setting two saved configs (``to_dict()``) hold differently;
    the ``resumable`` ones are left out unless asked for."""
    old, new = flatten(config_from_dict(before).to_dict()), flatten(config_from_dict(after).to_dict())
    allowed = set(resumable_keys())
    return [(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and (resumable or key not in allowed)]


def resume_config(saved: Config, flags: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
                  ) -> tuple[Config, list[tuple[str, Any, Any]]]:
    """The saved run's config with the settings ``--resume`` was given (``flags``, ``-c``
    ``overrides``) applied, and the ``(key, before, after)`` changes that makes. A value equal to the
    saved one is no change; changing a setting not declared ``resumable`` would make the resumed run
    another run: KilnError naming each such setting."""
    requested = {resolve_key(k): v for k, v in flags.items() if v is not None}
    for key, value in map(parse_override, overrides):
        requested[resolve_key(key)] = value
    checked = ConfigBuilder()  # each value's type and range, as a new run checks them
    for key, value in requested.items():
        checked.set(key, value, "flag")
    builder = ConfigBuilder(ranges=False)
    builder.apply(saved.to_dict(), "file")
    allowed = resumable_keys()
    refused: list[tuple[str, Any, Any]] = []
    changes: list[tuple[str, Any, Any]] = []
    for key in requested:
        if key.startswith("model.config."):
            sub = key.removeprefix("model.config.")
            old, new = saved.model.config.get(sub), checked.values["model.config"][sub]
        else:
            old, new = saved.get(key), checked.values[key]
        if new != old:
            (changes if key in allowed else refused).append((key, old, new))
            builder.set(key, new, "flag")
    if refused:
        shown = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in refused)
        raise KilnError(f"--resume continues a run with the settings it started with, and {shown} would make "
                        f"it another run: resume without {'it' if len(refused) == 1 else 'them'}, or start a "
                        f"new run (another -n, or --overwrite); a resume may change only "
                        f"{', '.join(key.split('.')[-1] for key in allowed)}")
    return builder.build(), changes


def config_from_dict(tree: dict) -> Config:
    """Rebuild a :class:`Config` from its saved ``to_dict()`` form (run directories)."""
    builder = ConfigBuilder(ranges=False)  # a run saved by an older kiln loads as it was saved
    builder.apply(tree, "file")
    return builder.build()


def resolve_key(name: str) -> str:
    """Dotted key for a setting named by its leaf (``lr`` -> ``optim.lr``) or already dotted."""
    if "." in name:
        return moved_keys().get(name, name)
    matches = [key for key, f in iter_settings()
               if key.split(".")[-1] == name or (f.metadata.get("flag") or "").lstrip("-").replace("-", "_") == name]
    fields = dict(iter_settings())
    flag = f"--{name}".replace("_", "-")
    flagged = [key for key in matches if fields[key].metadata.get("flag") == flag]
    if len(matches) == 1 or len(flagged) == 1:  # a CLI flag's name wins (seed -> train.seed, not generate.seed)
        return matches[0] if len(matches) == 1 else flagged[0]
    if not matches:
        close = difflib.get_close_matches(name, [k.split(".")[-1] for k, _ in iter_settings()], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KilnError(f"unknown setting '{name}'{hint}")
    raise KilnError(f"setting '{name}' is ambiguous: {', '.join(matches)}")
