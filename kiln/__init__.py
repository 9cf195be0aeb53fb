"""kiln: train and evaluate transformer NLP models and predict with them, offline, from the CLI or Python.

Heavy libraries (torch, transformers) are imported lazily, so importing kiln is instant.
"""

from __future__ import annotations

from typing import Any

import kiln.tasks  # noqa: F401 (registers each task's own settings section with kiln.config)
from kiln.log import install_default_handler
from kiln.training.callbacks import Callback
from kiln.version import __version__

install_default_handler()


def train(task: str, data: Any, **kwargs: Any) -> Any:
    """Train a model; see :func:`kiln.run.train`. Returns a :class:`kiln.run.Run`."""
    from kiln.run import train as _train

    return _train(task, data, **kwargs)


def load(path: Any, **kwargs: Any) -> Any:
    """Load a trained run or model directory; see :class:`kiln.predictor.Predictor`."""
    from kiln.predictor import load as _load

    return _load(path, **kwargs)


def tune(task: str, data: Any, **kwargs: Any) -> Any:
    """Search hyperparameters over kiln runs; see :func:`kiln.tuning.tune`. Returns the optuna study."""
    from kiln.tuning import tune as _tune

    return _tune(task, data, **kwargs)


__all__ = ["Callback", "__version__", "load", "train", "tune"]
