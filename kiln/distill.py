"""Distillation: a student task that learns from a trained teacher's outputs as well as from labels.

:class:`Distillation` wraps the student's task (composition: every call it does not change goes to
the task) when ``distill.teacher`` is set. The teacher runs once per example, and its logits are
cached on disk by the teacher's weights and the examples' text (``$KILN_CACHE/distill/``), so a
second run, or a resumed one, reuses them. Targets belong to examples (sequence tasks) or words
(tagging), never to sub-tokens, so the student may use a tokenizer of its own.

The loss of a training batch, summed over its units (examples; tagged words) like every kiln loss::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * the task's own loss

Inputs of ``distill.unlabeled`` have no label: the teacher's targets are all they train on.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kiln.config import DistillConfig
from kiln.errors import KilnError
from kiln.tasks.base import Dataset

log = logging.getLogger(__name__)

# Student task -> the teacher tasks it can learn from (the same outputs per example or word).
TEACHERS = {"sequence": ("sequence",), "sentence-pair": ("sentence-pair",), "token": ("token",)}


def soft_loss(student: Any, teacher: Any, temperature: float) -> Any:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` summed over rows (the last axis is the
    classes): the gradient's scale then does not change with T (Hinton et al., 2015)."""
    import torch.nn.functional as F

    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")


class Distillation:
    """The student's task, learning from ``settings.teacher`` as well as from its labels."""

    def __init__(self, task: Any, settings: DistillConfig) -> None:
        from kiln.files import read_json
        from kiln.model_files import KILN_FILE, model_dir_of

        self.task = task
        self.settings = settings
        if task.name not in TEACHERS:
            raise KilnError(f"kiln distill trains {', '.join(TEACHERS)} students, not {task.name}")
        teacher = Path(settings.teacher).expanduser()
        if not teacher.exists():
            raise KilnError("no such teacher run", teacher)
        self.teacher_dir = model_dir_of(teacher)
        meta = read_json(self.teacher_dir / KILN_FILE, required=("task", "task_state"))
        if meta["task"] not in TEACHERS[task.name]:
            raise KilnError(f"the teacher is a {meta['task']} model; a {task.name} student learns from a "
                            f"{' or '.join(TEACHERS[task.name])} teacher", self.teacher_dir)
        self.teacher_state = meta["task_state"]
        if self.teacher_state.get("problem_type", "classification") != "classification":
            raise KilnError(f"the teacher is a {self.teacher_state['problem_type']} model; distillation takes "
                            "single-label classification and tagging teachers", self.teacher_dir)
        self.teacher_metrics: dict[str, float] = {}
        self._teacher: Any = None  # its Predictor, loaded once when first needed (cached targets need none)
        self._train: Dataset | None = None
        self._unlabeled: Dataset | None = None
        self._plan: Any = None  # which of the teacher's weights a new student starts from
        self._augmented = 0  # perturbed training inputs made for the teacher to label
        self._start_note = ""  # how the student started, for the summary (a resumed run: nothing new)

    def __getattr__(self, name: str) -> Any:  # everything else is the student task's own
        if name == "task":  # not set yet (a copy being made): no task to ask
            raise AttributeError(name)
        return getattr(self.task, name)

    # -- before training ---------------------------------------------------------------------
    def fit(self, train: Dataset) -> None:
        """The task's fit, then the teacher's label order (a label the teacher does not know is an error)."""
        self.task.fit(train)
        if self.task.state.get("problem_type", "classification") != "classification":
            raise KilnError("distillation takes single-label classification data (the student's labels here "
                            f"make a {self.task.state['problem_type']} problem)", train.path)
        self._adopt_teacher_labels(train)

    def prepare(self, train: Dataset) -> None:
        """Name the training split (its features get the teacher's targets), and read and check the
        unlabelled file: before anything is written, on a new run and a resumed one alike."""
        self._train = train
        if self.settings.unlabeled:
            self._unlabeled = self.task.read(self.settings.unlabeled, labelled=False)
            if not self._unlabeled.examples:
                raise KilnError("holds no examples", self.settings.unlabeled)

    def _adopt_teacher_labels(self, train: Dataset) -> None:
        own, theirs = list(self.task.state["labels"]), list(self.teacher_state["labels"])
        unknown = [label for label in own if label not in theirs]
        if unknown:
            raise KilnError(f"label {unknown[0]!r} is not one of the teacher's ({', '.join(map(str, theirs))}): "
                            "a student learns the teacher's labels", train.path)
        self.task.state["labels"] = theirs
        weights = self.task.state.get("class_weights")
        if weights:  # in the teacher's order; a class this data lacks weighs 1
            self.task.state["class_weights"] = [weights[own.index(label)] if label in own else 1.0
                                                for label in theirs]
        seen = getattr(self.task, "seen", None)
        if isinstance(seen, dict) and "counts" in seen:
            seen["counts"] = [seen["counts"][own.index(label)] if label in own else 0 for label in theirs]

    # -- the student's start ---------------------------------------------------------------
    def student_architecture(self, model_type: str, arch: dict) -> dict:
        """The student's architecture settings, with the teacher's head size when it starts from the
        teacher (``distill.student_init``); why it cannot is kept for the summary."""
        from kiln.files import read_json
        from kiln.weight_selection import plan, student_architecture

        self._plan = None
        if self.settings.student_init != "teacher":
            self._start_note = "random weights (distill.student_init=random)"
            return arch
        self._plan, why = plan({**arch, "model_type": model_type}, read_json(self.teacher_dir / "config.json"))
        if self._plan is None:
            self._start_note = f"random weights: {why}"
            return arch
        return student_architecture(arch, self._plan)

    @property
    def starts_from_teacher(self) -> bool:
        """Whether the new student starts from a subset of the teacher's weights."""
        return self._plan is not None

    def start_student(self, model: Any, tokenizer: Any) -> None:
        """Copy the planned subset of the teacher's weights into the new student ``model``."""
        if self._plan is None:
            return
        from safetensors.torch import load_file

        from kiln.weight_selection import select

        weights: dict[str, Any] = {}
        for path in sorted(self.teacher_dir.glob("*.safetensors")):
            weights.update(load_file(str(path)))
        left = select(model, weights, self._plan, tokenizer, self._teacher_tokenizer)
        self._start_note = self._plan.describe() + (f" ({len(left)} tensors random: {', '.join(left[:3])})"
                                                    if left else "")

    def notes(self) -> list[str]:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.teacher_metrics.items() if k not in ("n", "loss"))
        line = f"teacher   {self.teacher_dir}" + (f": {shown} on validation" if shown else "")
        extra = [f"unlabeled {len(self._unlabeled):,} inputs labelled by the teacher ({self.settings.unlabeled})"] \
            if self._unlabeled is not None else []
        if self._augmented:
            extra.append(f"augment   {self._augmented:,} perturbed copies of the training inputs "
                         f"({self.settings.augment} per input), labelled by the teacher")
        start = [f"student   starts from {self._start_note}"] if self._start_note else []
        return [*self.task.notes(), line, *extra, *start,
                f"distill   alpha {self.settings.alpha:g} on the teacher's targets at temperature "
                f"{self.settings.temperature:g}"]

    # -- features ----------------------------------------------------------------------------
    def encode(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        """The task's features; the training split's (and the unlabelled inputs') carry the teacher's
        targets. The validation split is scored by the teacher once, for the summary."""
        features = self.task.encode(dataset, tokenizer, max_length)
        if dataset is not self._train:
            if not self.teacher_metrics and dataset.examples and self._labelled(dataset):
                self.teacher_metrics = self._teacher_scores(dataset)
            return features
        with_targets = self._attach(features, teacher_targets(self.teacher_dir, dataset, self._predictor))
        if self.settings.augment:
            mask = self._teacher_tokenizer.mask_token or "[MASK]"
            copies = augmented(dataset, self.settings.augment, mask)
            self._augmented = len(copies)
            with_targets += self._teacher_only(copies, tokenizer, max_length)
        if self._unlabeled is not None:
            with_targets += self._teacher_only(self._unlabeled, tokenizer, max_length)
        return with_targets

    def _teacher_only(self, dataset: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
        """Features of inputs without labels: only the teacher's targets train on them."""
        features = self.task.encode(dataset, tokenizer, max_length)
        for feature in features:
            if self.task.name == "token":
                feature["labels"] = [-100] * len(feature["input_ids"])
            else:
                feature["label"] = -100
        return self._attach(features, teacher_targets(self.teacher_dir, dataset, self._predictor))

    @functools.cached_property
    def _teacher_tokenizer(self) -> Any:
        """The teacher's tokenizer (its Predictor's when that is loaded), read once."""
        from kiln.tokenizers import load_tokenizer

        return self._teacher.tokenizer if self._teacher is not None else load_tokenizer(self.teacher_dir)

    def _labelled(self, dataset: Dataset) -> bool:
        key = "tags" if self.task.name == "token" else "label"
        return all(example.get(key) is not None for example in dataset.examples)

    def _teacher_scores(self, dataset: Dataset) -> dict[str, float]:
        return self._predictor().evaluate(dataset)

    def _predictor(self) -> Any:
        if self._teacher is None:
            self._teacher = _load(self.teacher_dir)
        return self._teacher

    def _attach(self, features: list[dict], targets: list[Any]) -> list[dict]:
        """Each feature's ``teacher`` rows: its example's logits, or (tagging) ``[position, logits]``
        for each word it owns whose logits the teacher has."""
        import numpy as np

        for feature in features:
            rows = targets[feature["example"]]
            if self.task.name == "token":  # a NaN row: the teacher saw no sub-token of that word
                feature["teacher"] = [(position, rows[word].tolist()) for word, position in feature["words"]
                                      if not np.isnan(rows[word]).any()]
            else:
                feature["teacher"] = rows.tolist()
        return features

    def collate_training(self, features: Sequence[dict], pad_id: int, epoch: int) -> dict:
        import torch

        batch = self.task.collate_training(features, pad_id, epoch)
        if self.task.name != "token":
            batch["teacher"] = torch.tensor([f["teacher"] for f in features], dtype=torch.float32)
            return batch
        length, classes = batch["input_ids"].shape[1], len(self.task.state["labels"])
        teacher = torch.zeros(len(features), length, classes)
        mask = torch.zeros(len(features), length, dtype=torch.bool)
        for row, feature in enumerate(features):
            for position, logits in feature["teacher"]:
                teacher[row, position] = torch.tensor(logits)
                mask[row, position] = True
        batch["teacher"], batch["teacher_mask"] = teacher, mask
        return batch

    # -- the loss ----------------------------------------------------------------------------
    def loss(self, outputs: Any, batch: dict) -> Any:
        """The mix of the teacher's soft targets and the task's own loss (evaluation: the task's)."""
        own = self.task.loss(outputs, batch)
        if "teacher" not in batch:
            return own
        logits, teacher = outputs.logits, batch["teacher"]
        if "teacher_mask" in batch:
            mask = batch["teacher_mask"]
            logits, teacher = logits[mask], teacher[mask]
        alpha = self.settings.alpha
        return alpha * soft_loss(logits, teacher, self.settings.temperature) + (1 - alpha) * own

    def loss_units(self, batch: dict) -> int:
        """Every example (or word) with a teacher target counts, labelled or not."""
        if "teacher_mask" in batch:
            return int(batch["teacher_mask"].sum())
        if "teacher" in batch:
            return len(batch["teacher"])
        return self.task.loss_units(batch)


def augmented(dataset: Dataset, copies: int, mask: str, p_mask: float = 0.1, p_ngram: float = 0.25,
              seed: int = 0) -> Dataset:
    """Up to ``copies`` perturbed versions of each example, without labels, as Tang et al. (2019) make
    them for distillation: each word is replaced by ``mask`` with probability ``p_mask``, then with
    probability ``p_ngram`` only a random n-gram (n from 1 to 5) of each text is kept. Copies equal
    to an input (or to one another) are dropped; the same ``seed`` gives the same copies, so the
    teacher's targets for them are cached."""
    import random

    rng = random.Random(seed)

    def perturb(words: Sequence[str]) -> list[str]:
        out = [mask if rng.random() < p_mask else word for word in words]
        if len(out) > 1 and rng.random() < p_ngram:
            n = min(rng.randint(1, 5), len(out))
            start = rng.randrange(len(out) - n + 1)
            out = out[start:start + n]
        return out

    def key(example: dict) -> str:
        return json.dumps(_inputs(example), ensure_ascii=False)

    seen = {key(example) for example in dataset.examples}
    made = []
    for example in dataset.examples:
        for _ in range(copies):
            if "words" in example:
                copy = {**example, "words": perturb(example["words"]), "tags": None}
            else:
                copy = {**example, "texts": tuple(" ".join(perturb(text.split())) for text in example["texts"]),
                        "label": None}
            if key(copy) not in seen:
                seen.add(key(copy))
                made.append(copy)
    return Dataset(dataset.path, made)


def teacher_targets(teacher_dir: Path, dataset: Dataset, predictor: Callable[[], Any] | None = None) -> list[Any]:
    """The teacher's logits for each example of ``dataset`` (tagging: a ``(words, classes)`` array,
    NaN for a word it saw no sub-token of), from the cache or computed once and cached. ``predictor``
    gives the teacher's loaded :class:`~kiln.predictor.Predictor` (default: load it here)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from kiln.tokenizers import kiln_cache

    path = kiln_cache() / "distill" / f"{_cache_key(teacher_dir, dataset)}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        logits, offsets = stored["logits"], stored["offsets"]
    else:
        log.info(f"  teacher   scoring {len(dataset):,} examples of {dataset.path} once (cached in {path.parent})")
        rows = _teacher_rows(predictor() if predictor else _load(teacher_dir), dataset)
        offsets = np.cumsum([0, *(len(r) if r.ndim == 2 else 1 for r in rows)]).astype(np.int64)
        logits = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows]).astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"logits": logits, "offsets": offsets}, str(tmp))
        tmp.replace(path)
    per_word = _is_tagging(teacher_dir)
    return [logits[a:b] if per_word else logits[a] for a, b in itertools.pairwise(offsets)]


def _is_tagging(teacher_dir: Path) -> bool:
    from kiln.files import read_json

    return bool(read_json(teacher_dir / "kiln.json", required=("task",))["task"] == "token")


def _cache_key(teacher_dir: Path, dataset: Dataset) -> str:
    """The teacher's weights (their sha256 in its manifest, else hashed) and the examples' inputs."""
    from kiln.pretrained import sha256

    digest = hashlib.sha256()
    weights = sorted(teacher_dir.glob("*.safetensors"))
    digest.update("".join(sha256(w) for w in weights).encode())
    inputs = [_inputs(example) for example in dataset.examples]
    digest.update(json.dumps(inputs, ensure_ascii=False).encode())
    return digest.hexdigest()[:32]


def _inputs(example: dict) -> Any:
    """What the teacher reads of an example: its words (tagging) or its texts."""
    return example.get("words") or example.get("texts")


def _load(teacher_dir: Path) -> Any:
    """The teacher's :class:`~kiln.predictor.Predictor`, in the precision the hardware does best."""
    from kiln.predictor import Predictor

    return Predictor(teacher_dir, precision="auto")


def _teacher_rows(predictor: Any, dataset: Dataset) -> list[Any]:
    """Run the teacher over ``dataset``: one logits row per example (windows of a long text averaged),
    or one per word (its first sub-token's)."""
    import numpy as np

    from kiln.training.inference import run_inference

    task = predictor.task
    features = task.encode(dataset, predictor.tokenizer, predictor.max_length)
    outputs, _, _ = run_inference(predictor.model, task, features, device=predictor.device,
                                  precision=predictor.precision, batch_tokens=predictor.batch_tokens,
                                  max_batch_size=predictor.config.train.max_batch_size * 2,
                                  pad_id=predictor.tokenizer.pad_token_id or 0)
    classes = len(task.state["labels"])
    if task.name == "token":
        rows = [np.full((len(example["words"]), classes), np.nan, dtype=np.float32) for example in dataset.examples]
        for logits, feature in zip(outputs, features, strict=True):
            for word, position in feature["words"]:
                rows[feature["example"]][word] = logits[position]
        return rows
    grouped: list[list[Any]] = [[] for _ in dataset.examples]
    for logits, feature in zip(outputs, features, strict=True):
        grouped[feature["example"]].append(np.asarray(logits, dtype=np.float32))
    return [np.mean(windows, axis=0) for windows in grouped]
