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

    def notes(self) -> list[str]:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.teacher_metrics.items() if k not in ("n", "loss"))
        line = f"teacher   {self.teacher_dir}" + (f": {shown} on validation" if shown else "")
        extra = f"unlabeled {len(self._unlabeled):,} inputs labelled by the teacher ({self.settings.unlabeled})" \
            if self._unlabeled is not None else None
        return [*self.task.notes(), line, *([extra] if extra else []),
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
        if self._unlabeled is not None:
            extra = self.task.encode(self._unlabeled, tokenizer, max_length)
            for feature in extra:  # no label: only the teacher's targets train on it
                if self.task.name == "token":
                    feature["labels"] = [-100] * len(feature["input_ids"])
                else:
                    feature["label"] = -100
            with_targets += self._attach(extra, teacher_targets(self.teacher_dir, self._unlabeled, self._predictor))
        return with_targets

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
    inputs = [example.get("words") or example.get("texts") for example in dataset.examples]
    digest.update(json.dumps(inputs, ensure_ascii=False).encode())
    return digest.hexdigest()[:32]


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
