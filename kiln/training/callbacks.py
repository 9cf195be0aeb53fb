"""Callbacks: what happens around the loop without being the loop (progress, reporting).

The trainer calls every callback's hooks in order; a callback never changes what is trained,
except that it may end training gracefully by setting ``trainer.should_stop = True``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.training.trainer import Trainer

log = logging.getLogger(__name__)


class Callback:
    """Hooks into the loop. Set ``trainer.should_stop = True`` to end training gracefully."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Called once, after set-up (and after restoring a resumed run)."""

    def on_step_end(self, trainer: Trainer, logs: dict | None) -> None:
        """Called after every optimizer step; ``logs`` is set on logging steps only."""

    def on_evaluate(self, trainer: Trainer, metrics: dict) -> None:
        """Called after each evaluation with its metrics."""

    def on_log(self, trainer: Trainer, record: dict) -> None:
        """Called on the main rank with every record written to ``metrics.jsonl`` (training windows
        and evaluations)."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Called once when training ends: finished, stopped early or interrupted."""

    def on_export(self, run_dir: Path, model_dir: Path) -> None:
        """Called on the main rank after the best model is exported to ``model_dir``."""


def duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressCallback(Callback):
    """Training progress on stderr: a tqdm bar on a terminal, plain lines anywhere else.

    Off a terminal (nohup, SLURM, CI, a notebook's log) a bar is noise, and nothing at all between
    evaluations looks like a hang. There a line goes out at logging steps (``train.log_every``),
    at most every ``min_interval`` seconds, and at least every ``max_interval`` seconds:
    step/total, loss, learning rate, tokens/s, elapsed and ETA. Only the main rank reports, and
    only when the ``kiln`` logger shows INFO.
    """

    def __init__(self, min_interval: float = 5.0, max_interval: float = 60.0):
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.bar: Any = None
        self.enabled = False

    def on_train_begin(self, trainer: Trainer) -> None:
        self.enabled = trainer.is_main and log.isEnabledFor(logging.INFO)
        self.last_time = time.perf_counter()
        self.last_tokens = trainer.state.tokens_seen
        self.start_step = trainer.state.step
        self.start_seconds = trainer.state.train_seconds
        self.lines = 0
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            total = trainer.total_steps if not trainer.budget else None
            self.bar = tqdm(total=total, initial=trainer.state.step, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def on_step_end(self, trainer: Trainer, logs: dict | None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}",
                                     tok_s=f"{logs['tokens_per_s']:.0f}")
            return
        since = time.perf_counter() - self.last_time
        if (logs and (self.lines == 0 or since >= self.min_interval)) or since >= self.max_interval:
            log.info(self.line(trainer, logs, since))
            self.lines += 1
            self.last_time = time.perf_counter()
            self.last_tokens = trainer.state.tokens_seen

    def line(self, trainer: Trainer, logs: dict | None, since: float) -> str:
        """One plain progress line."""
        state = trainer.state
        if logs is None:  # a time-based line between logging steps: the last step's loss
            logs = {"loss": float(trainer.step_loss), "lr": trainer.optimizer.param_groups[0]["lr"],
                    "tokens_per_s": (state.tokens_seen - self.last_tokens) / max(since, 1e-9)}
        if trainer.budget:
            total, left = "", max(trainer.budget - state.train_seconds, 0.0)
        else:
            done = state.step - self.start_step
            per_step = (state.train_seconds - self.start_seconds) / max(done, 1)
            total, left = f"/{trainer.total_steps}", per_step * (trainer.total_steps - state.step)
        return (f"  step {state.step}{total}  loss {logs['loss']:.4f}  lr {logs['lr']:.2e}  "
                f"{logs['tokens_per_s']:,.0f} tok/s  elapsed {duration(state.train_seconds)}  ETA {duration(left)}")

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
