"""Task registry. Each task is one module behind the :class:`~kiln.tasks.base.Task` interface."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kiln.config import register_sections
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.tasks.base import Task

# name -> "module:Class"; imported lazily so `kiln --help` stays fast.
TASKS: dict[str, str] = {
    "sequence": "kiln.tasks.sequence:SequenceTask",
    "sentence-pair": "kiln.tasks.sequence:SentencePairTask",
    "token": "kiln.tasks.token:TokenTask",
    "qa": "kiln.tasks.qa:QuestionAnsweringTask",
    "multiple-choice": "kiln.tasks.multiple_choice:MultipleChoiceTask",
    "embedding": "kiln.tasks.embedding:EmbeddingTask",
    "generation": "kiln.tasks.generation:GenerationTask",
    "mlm": "kiln.tasks.pretrain:MaskedLMTask",
    "clm": "kiln.tasks.pretrain:CausalLMTask",
    "span": "kiln.tasks.pretrain:SpanCorruptionTask",
}


def task_class(name: str) -> type[Task]:
    """The Task class registered under ``name``."""
    if name not in TASKS:
        raise KilnError(f"unknown task '{name}'; choose one of {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_task(name: str, config: Any, state: dict | None = None) -> Task:
    """Instantiate the task ``name`` for ``config`` (and a saved state, for trained runs)."""
    return task_class(name)(config, state)


def _sections() -> dict[str, type]:
    """Each task's own settings section (``qa``: its dataclass), for the config schema."""
    found: dict[str, type] = {}
    for name in TASKS:
        task = task_class(name)
        if task.settings_class is not None:
            found[task.section] = task.settings_class
    return found


register_sections(_sections)
