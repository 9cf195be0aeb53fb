"""The one training loop, shared by every task.

It reads top to bottom: set up (and resume), then for each optimizer step take ``grad_accum``
micro-batches, run :meth:`Trainer.training_step`, log, evaluate, checkpoint. Tasks plug in through
the :class:`~kiln.tasks.base.Task` interface; behaviour plugs in by overriding ``compute_loss``,
``training_step``, ``evaluate`` or ``predict``, or through :class:`Callback` objects, which also
do all the reporting (the metrics file, progress, the summary, trackers).

Rank-aware through one :class:`~kiln.training.distributed.Strategy`: under ``torchrun`` every rank
takes its share of each step's micro-batches, and only rank 0 prints or writes files. The data
position is counted in global micro-batches, so a run resumes at another number of processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shlex
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.config import Config, parse_duration, parse_save_every
from kiln.errors import KilnError, RunStopped
from kiln.files import DAMAGED, write_text_atomic
from kiln.metrics import metrics_line
from kiln.models import set_dropout, training_attention
from kiln.training import checkpoint as ckpt
from kiln.training import compile as compiling
from kiln.training.batching import TokenBudgetSampler, feature_lengths
from kiln.training.callbacks import (
    Callback,
    MetricsFileCallback,
    ProgressCallback,
    SummaryCallback,
    duration,
)
from kiln.training.device import autocast, keep_freed_memory, mark, resolve_device, resolve_precision
from kiln.training.distributed import strategy_for, world
from kiln.training.inference import run_inference_share, to_device
from kiln.training.optim import (
    build_optimizer,
    lr_at_fraction,
    lr_multiplier,
    planned_steps,
    ramp_accumulation,
    warmup_steps,
)

__all__ = ["Callback", "Trainer", "TrainerState"]


@dataclass
class TrainerState:
    """Where training stands; saved as JSON in every checkpoint so resuming is exact."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` consumed, by all ranks together
    best_metric: float | None = None
    best_loss: float = float("inf")
    best_step: int = -1
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    tokens_seen: int = 0
    examples_seen: int = 0
    train_seconds: float = 0.0
    world_size: int = 1  # processes when it was saved: resuming at another count keeps the global batch
    grad_accum: int = 0  # grad_accum in force when it was saved (0: the config's)
    skipped_steps: int = 0  # steps not applied: their loss or gradient was not finite
    micro_split: int = 1  # --auto-batch: each micro-batch runs as this many pieces (kept on resume)
    nonfinite_streak: int = 0
    last_save_seconds: float = 0.0
    # The logging window in progress (its sums), so a resumed run logs the same lines.
    window: dict = field(default_factory=lambda: {"loss": 0.0, "steps": 0, "tokens": 0, "examples": 0})

    @classmethod
    def from_saved(cls, saved: dict, path: Path) -> TrainerState:
        """The state a checkpoint's ``trainer_state.json`` holds, each known entry checked for its
        type and range (a damaged or hand-edited file is one line naming it, not a TypeError later)."""
        state = cls()
        for name, declared in cls.__dataclass_fields__.items():
            if name not in saved:
                continue
            value, default = saved[name], getattr(state, name)
            if name == "window":
                ok = isinstance(value, dict) and all(_is_number(v) for v in value.values())
            elif name == "best_metric":
                ok = value is None or _is_number(value)
            elif isinstance(default, float):
                ok = _is_number(value) and (name == "best_loss" or value >= 0)
            else:  # counts; best_step and last_eval_step are -1 before the first evaluation
                lowest = -1 if name in ("best_step", "last_eval_step") else 1 if name in (
                    "world_size", "micro_split") else 0
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= lowest
            if not ok:
                raise KilnError(f"'{name}' is {value!r}, not a valid {declared.type}; {DAMAGED}", path)
            setattr(state, name, value)
        return state


@dataclass
class Step:
    """One optimizer step's data: this rank's micro-batches and the whole job's token and example counts."""

    micro_batches: list[list[int]]
    consumed: int  # global micro-batches the step takes from the epoch
    tokens: int
    examples: int


log = logging.getLogger(__name__)


class Trainer:
    """Trains ``model`` on ``train_features`` for ``task`` as ``config.train`` says."""

    def __init__(
        self,
        model: Any,
        task: Any,
        config: Config,
        tokenizer: Any,
        train_features: list[dict],
        eval_features: list[dict] | None = None,
        eval_dataset: Any = None,
        run_dir: str | Path | None = None,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
        kiln_meta: dict | None = None,
        description: dict | None = None,
    ):
        self.model = model
        self.task = task
        self.config = config
        self.tokenizer = tokenizer
        self.train_features = train_features
        self.eval_features = eval_features or []
        self.eval_dataset = eval_dataset
        self.run_dir = Path(run_dir) if run_dir else None
        self.callbacks = [SummaryCallback(), MetricsFileCallback(), ProgressCallback(), *callbacks]
        self.kiln_meta = kiln_meta or {}
        self.description = description or {}
        self.state = TrainerState()
        self.should_stop = False
        self.step_loss: Any = 0.0  # the last step's mean loss (a device tensor: read it rarely)
        self.grad_norm: Any = 0.0  # the last step's gradient norm, before clipping
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.last_metrics: dict = {}
        self.best_metrics: dict = {}
        self._window_loss: Any = 0.0  # this rank's losses since the last log or save (on the device)
        self._saved_step = -1
        self._written: set[Path] = set()  # step checkpoints this process saved
        self._updating = False  # training_step is past backward (clipping, the optimizer step)
        self._stop_signal: str | None = None  # set by SIGTERM or the first Ctrl-C, acted on at the step's end
        self._interrupt_now = False  # a second Ctrl-C: stop mid-step, without saving
        # Batches at construction, so a run with none fails before its run directory is written
        # (and before a rank with none could hang its peers in the first all-reduce).
        train = config.train
        self.sampler = TokenBudgetSampler(
            feature_lengths(train_features), batch_tokens=train.batch_tokens,
            max_batch_size=train.max_batch_size, batch_size=train.batch_size, shuffle=True,
            seed=train.seed, rank=self.rank, world_size=self.world_size,
            order=task.training_order(train_features),
        )
        if not self.sampler.batches(0):
            share = f" for each of {self.world_size} ranks" if self.world_size > 1 else ""
            raise KilnError(f"{len(train_features)} training features make no batch{share}")

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, resume: bool = False) -> None:
        """Device, precision, the distributed strategy, optimizer, step count (and the resumed state)."""
        import torch

        train = self.config.train
        self.device = resolve_device(train.device)
        self.precision = resolve_precision(train.precision, self.device)
        keep_freed_memory()
        if train.dropout is not None:
            set_dropout(self.model, train.dropout)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if train.auto_batch and self.world_size > 1:
            raise KilnError("--auto-batch splits micro-batches in one process only (the ranks would have to "
                            "agree on each retry); with several, use a smaller --batch-tokens and more --grad-accum")
        self.strategy = strategy_for(self.device, train.fsdp, self.precision, train.cpu_offload,
                                     parse_duration(train.dist_timeout))
        self.model.to(self.device)
        self.attention = training_attention(self.model, self.device, self.precision,
                                            int(self.sampler.lengths.max()))
        if train.grad_checkpoint:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        resumed = self._checkpoint_to_resume() if resume else None
        if resume and resumed is None and self.is_main and self.run_dir is not None:
            _cut_metrics(self.run_dir / "metrics.jsonl", 0)  # killed before its first checkpoint: start over
        if resumed is not None:  # weights go in before sharding, which replaces the parameters
            ckpt.load_weights(self.model, resumed)
        # What the loop calls: the model, or a task's wrapper around it (sharing its parameters).
        self.module = self.strategy.wrap(self.model, self.task.training_module(self.model))
        self.optimizer = build_optimizer(self.model, self.config.optim, self.device.type)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.budget = parse_duration(train.budget)
        self.save_steps, self.save_seconds = parse_save_every(train.save_every)
        self.metric = train.metric or self.task.main_metric
        if resumed is not None:
            self._restore(resumed)
        self._epoch_sizes, self._planned_batches = self._planned_micro_batches()
        self.total_steps = self._total_steps()
        self.warmup = warmup_steps(self.config.schedule, self.total_steps)
        self._compile()
        log.debug(f"set-up: {self.total_steps} steps ({self.warmup} warmup), {len(self._epoch_sizes)} epochs of "
                  f"{self._epoch_sizes} micro-batches per rank, {type(self.optimizer).__name__}, best by "
                  f"{self.metric}, {self.strategy.name}, rank {self.rank} of {self.world_size}")

    def _compile(self) -> None:
        """``train.compile``: the module the loop calls, compiled by inductor where that is wanted and
        can work (else eager, said once); :attr:`compile_watch` counts and times its shapes."""
        self.compile_watch: compiling.CompileWatch | None = None
        long_run = (self.budget >= compiling.AUTO_MIN_SECONDS if self.budget
                    else self.total_steps >= compiling.AUTO_MIN_STEPS)
        if not compiling.wanted(self.config.train.compile, self.device, long_run):
            return
        compiled = compiling.compile_module(self.module, self.device)
        if compiled is not None:
            self.module, self.compile_watch = compiled, compiling.CompileWatch()

    def _planned_micro_batches(self) -> tuple[list[int], int]:
        """Micro-batches per rank in each epoch that ``train.epochs`` covers, and how many to train."""
        train = self.config.train
        if train.max_steps > 0 or self.budget:
            return [], 0
        whole = int(train.epochs)
        part = train.epochs - whole
        sizes = [len(self.sampler.batches(e)) for e in range(whole + (part > 0))]
        return sizes, sum(sizes[:whole]) + (int(part * sizes[whole]) if part > 0 else 0)

    def _total_steps(self) -> int:
        train = self.config.train
        if train.max_steps > 0:
            return train.max_steps
        if self.budget:  # time decides; steps are unbounded
            return 2**62
        return planned_steps(self._epoch_sizes, self._planned_batches, train.grad_accum, train.batch_ramp)

    # -- override points ---------------------------------------------------------------------
    def compute_loss(self, model: Any, batch: dict) -> Any:
        """Forward one micro-batch; returns the loss summed over its loss units."""
        with autocast(self.device, self.precision):
            outputs = model(**self.task.model_inputs(batch))
        return self.task.loss(outputs, batch)

    def training_step(self, micro_batches: list[dict]) -> Any:
        """One optimizer step over ``grad_accum`` micro-batches.

        The loss is normalised by the loss units (examples or tokens) of the *whole* accumulated
        batch of every rank, so accumulating k micro-batches (or k ranks) gives the same gradient as
        one k-times-larger batch. A step whose gradient is not finite is not applied (fp16's
        overflows are the grad scaler's). Returns the detached mean loss per unit.
        """
        import torch

        self.module.train()
        self._updating = False
        units = sum(self.task.loss_units(b) for b in micro_batches)
        if self.world_size > 1:  # the ranks average gradients; normalise by the global count
            units = self.strategy.all_reduce([units])[0] / self.world_size
        units = max(units, 1)
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            batch = to_device(batch, self.device)
            with self.strategy.sync(self.module, last=index == len(micro_batches) - 1):
                with mark("kiln.forward"):
                    loss = self.compute_loss(self.module, batch) / units
                with mark("kiln.backward"):
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        with mark("kiln.optimizer"):
            self._update()
        return total

    def _update(self) -> None:
        """Clip and apply the accumulated gradient (or skip a non-finite one), then drop it."""
        import torch

        self._updating = True  # from here on an out-of-memory is the optimizer's: splitting cannot help
        self._set_lr()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        self.grad_norm = self.strategy.clip_grad_norm(self.model, self.config.train.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif bool(torch.isfinite(self.grad_norm)):
            self.optimizer.step()
            self.state.nonfinite_streak = 0
        else:  # NaN/inf anywhere in any rank's loss or gradient reaches the global norm: all ranks skip
            self.state.skipped_steps += 1
            self.state.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, features: list[dict] | None = None, dataset: Any = None) -> dict:
        """Loss and task metrics on ``features`` (default: the validation set), computed once over the
        whole set: under several processes each predicts its share and the main rank scores them."""
        features = self.eval_features if features is None else features
        dataset = self.eval_dataset if dataset is None else dataset
        outputs, loss_sum, units = self.predict(features)
        metrics = None
        if self.is_main:
            predictions = self.task.decode(outputs, features, dataset)
            if dataset is self.eval_dataset:  # validation, not a test split: what decoding learns from it
                self.task.calibrate(predictions, dataset)
            metrics = self.task.metrics(predictions, dataset)
            metrics["loss"] = loss_sum / max(units, 1)
            metrics.update(self.task.loss_metrics(metrics["loss"]))
            metrics["n"] = len(dataset)
        return self.strategy.broadcast(metrics)

    def predict(self, features: list[dict]) -> tuple[list[Any], float, int]:
        """Per-feature outputs in input order, plus the loss sum and units when labelled. Each rank
        takes every world_size-th of the batches one process would run, so every output (and each
        batch's loss) is computed exactly as in one process."""
        outputs, batch_losses, units = run_inference_share(
            self.model, self.task, features, device=self.device, precision=self.precision,
            batch_tokens=self.config.train.batch_tokens * 2, max_batch_size=self.config.train.max_batch_size * 2,
            pad_id=self.pad_id, share=(self.rank, self.world_size), lockstep=self.strategy.sharded,
            module=self.module if self.strategy.sharded else None)  # DDP's forward would sync buffers
        if self.world_size == 1:
            return outputs, sum(batch_losses.values()), units
        merged: list[Any] = [None] * len(features)
        losses: dict[int, float] = {}
        total_units = 0
        for part, part_losses, part_units in self.strategy.gather((
                {i: v for i, v in enumerate(outputs) if v is not None}, batch_losses, units)):
            for i, value in part.items():
                merged[i] = value
            losses.update(part_losses)
            total_units += part_units
        return merged, sum(losses[b] for b in sorted(losses)), total_units  # summed in one process's order

    # -- the loop ----------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        """Run training to the end (or early stop); returns the validation metrics of the best
        checkpoint, the model that is exported."""
        clock = time.perf_counter()  # a budget counts set-up (and any compile warm-up) too
        self.setup(resume)
        self._call("on_train_begin")
        started = clock - self.state.train_seconds
        window_start = time.perf_counter()
        with self._signals():
            try:
                while self.state.step < self.total_steps and not self.should_stop:
                    step = self._next_step()
                    if step is None:  # the epoch is used up
                        self._end_epoch()
                        continue
                    self.step_loss = self._run_step(step)
                    window_start = self._after_step(step, started, window_start)
                if self.state.last_eval_step != self.state.step:
                    self._evaluate_and_checkpoint()
            except KeyboardInterrupt:
                self._interrupted()
                raise
            except RunStopped:  # a planned stop, at the same step on every rank
                self._call("on_train_end")
                self._close()
                raise
            except Exception:  # a failure: the reporters close all the same (torchrun stops the other ranks)
                self._call("on_train_end")
                self.module = self.model
                raise
        self._call("on_train_end")
        self._close()
        return self.best_metrics or self.last_metrics

    def _after_step(self, step: Any, started: float, window_start: float) -> float:
        """Everything a finished step sets off: counting, logging, budget, evaluation, checkpoints,
        signals, the epoch's end. Returns when the current logging window started."""
        self._count(step, started)
        stop_signal = self._agree_across_ranks()
        out_of_time = bool(self.budget) and self.state.train_seconds >= self.budget
        logs = None
        if self.state.step % self.config.train.log_every == 0 or out_of_time \
                or self.state.step == self.total_steps:  # a budget run's last step is logged
            logs = self._log_window(time.perf_counter() - window_start)
            window_start = time.perf_counter()
        if out_of_time:
            self._say(f"  budget    {duration(self.budget)} spent at step {self.state.step}")
            self.should_stop = True
        self._call("on_step_end", logs)
        self._check_finite()
        if self.config.train.eval_every and self.state.step % self.config.train.eval_every == 0:
            self._evaluate_and_checkpoint()
        elif self._save_due():
            self._save()
        if self.world_size == 1:  # alone, a signal during this step's reporting counts too
            stop_signal = self._stop_signal
        if stop_signal:
            self._stop_for_signal(stop_signal)
        if self.state.batch_in_epoch >= len(self.sampler.global_batches(self.state.epoch)):
            self._end_epoch()
        if self.world_size > 1:  # a callback on rank 0 alone may have asked to stop
            self.should_stop = bool(self.strategy.all_reduce([self.should_stop], "max")[0])
        return window_start

    def _interrupted(self) -> None:
        """Ctrl-C: save where it is safe to, and say how to go on."""
        self._call("on_train_end")
        # Mid-step the weights and the step count may disagree; and a save is a collective that
        # the other ranks, not interrupted, would never join.
        if self._interrupt_now or self.world_size > 1:
            self._say(f"interrupted during step {self.state.step + 1}; not saved: --resume continues "
                      "from the last checkpoint", logging.WARNING)
        else:
            self._save()
            self._say(f"interrupted at step {self.state.step}; continue with --resume", logging.WARNING)
        self.module = self.model  # see _close; the other ranks may not be here to close the group

    def _close(self) -> None:
        """Drop the strategy's wrapper, then close the strategy. DDP's wrapper holds the process group:
        it must go first, or the group's destruction could deadlock (see DDP.close), also at exit."""
        self.module = self.model
        self.strategy.close()

    def _next_step(self) -> Step | None:
        """The next step's micro-batches for this rank, or None when the epoch has no full step left.

        Rank r of W takes global micro-batches p + r, p + r + W, … from the epoch's position p, so
        W ranks each accumulating k equal one process accumulating k·W.
        """
        batches = self.sampler.global_batches(self.state.epoch)
        position, ranks = self.state.batch_in_epoch, self.world_size
        per_rank = min(self.accumulation(), (len(batches) - position) // ranks)
        if per_rank <= 0:
            return None
        taken = [batches[position + i] for i in range(per_rank * ranks)]
        lengths = self.sampler.lengths
        return Step(micro_batches=taken[self.rank::ranks], consumed=len(taken),
                    tokens=int(sum(int(lengths[ids].sum()) for ids in taken)),
                    examples=sum(len(ids) for ids in taken))

    def _run_step(self, step: Step) -> Any:
        """Collate and train one step; on CUDA out-of-memory, with ``--auto-batch``, run it again with
        each micro-batch split in two (the same examples, so the same effective batch)."""
        import torch

        while True:
            pieces = [piece for ids in step.micro_batches for piece in _split(ids, self.state.micro_split)]
            with mark("kiln.collate"):
                micro = [self.task.collate_training([self.train_features[i] for i in ids], self.pad_id,
                                                    self.state.epoch) for ids in pieces]
            watch = self.compile_watch
            try:
                if watch is not None:
                    watch.begin(micro)
                loss = self.training_step(micro)
                if watch is not None:
                    watch.end()
                return loss
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                largest = max(len(ids) for ids in step.micro_batches)
                if not self.config.train.auto_batch or self.state.micro_split >= largest or self._updating:
                    raise KilnError(self._oom_message()) from None
                self.state.micro_split *= 2
                torch.cuda.empty_cache()
                self._say(f"  out of memory at step {self.state.step + 1}: micro-batches now run in "
                          f"{self.state.micro_split} pieces (--auto-batch; the effective batch is unchanged)",
                          logging.WARNING)
            except Exception as error:
                if watch is None or not compiling.compile_failed(error) or self._updating:
                    raise
                compiling.fall_back(error)  # an architecture inductor cannot compile: the step again, eagerly
                self.optimizer.zero_grad(set_to_none=True)
                self.module, self.compile_watch = self.module._orig_mod, None  # what torch.compile wrapped
                continue

    def _count(self, step: Step, started: float) -> None:
        state = self.state
        state.step += 1
        state.batch_in_epoch += step.consumed
        state.tokens_seen += step.tokens
        state.examples_seen += step.examples
        state.train_seconds = time.perf_counter() - started
        window = state.window
        window["tokens"] += step.tokens
        window["examples"] += step.examples
        if state.nonfinite_streak:  # a skipped step's loss is not a loss: it would make the window's NaN
            return
        window["steps"] += 1
        # Summed on the device, in float64: float32 losses then add up exactly, so a window split by a
        # checkpoint (folded into the state there) logs the same mean as one that was not.
        self._window_loss = self._window_loss + self.step_loss.double()

    def _log_window(self, elapsed: float) -> dict:
        """The logged line of the window since the last one: the mean loss of the job's global batches."""
        window = self.state.window
        loss = window["loss"] + self._fold_window_loss()
        elapsed = max(elapsed, 1e-9)
        logs = {"step": self.state.step, "epoch": round(self._epoch_progress(), 4),
                "loss": loss / max(window["steps"], 1), "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": _finite(float(self.grad_norm)), "tokens_per_s": window["tokens"] / elapsed,
                "examples_per_s": window["examples"] / elapsed, "tokens": self.state.tokens_seen,
                "elapsed": self.state.train_seconds}
        if self.state.skipped_steps:
            logs["skipped_steps"] = self.state.skipped_steps
        self.state.window = {"loss": 0.0, "steps": 0, "tokens": 0, "examples": 0}
        self._log(logs)
        return logs

    def _fold_window_loss(self) -> float:
        """This rank's window loss since the last fold, as the job's (a collective), restarted at 0."""
        local = float(self._window_loss)
        self._window_loss = 0.0
        return self.strategy.all_reduce([local])[0] / self.world_size

    def _end_epoch(self) -> None:
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        if not self.config.train.eval_every and not self.should_stop:
            self._evaluate_and_checkpoint()

    def _epoch_progress(self) -> float:
        usable = len(self.sampler.global_batches(self.state.epoch))
        return self.state.epoch + self.state.batch_in_epoch / max(usable, 1)

    def fraction(self) -> float:
        """How much of training is done: steps done/total or, with a budget, elapsed/budget, whichever
        is further along (with both, training stops on whichever ends first, and so do the schedules)."""
        done = self.state.step / max(self.total_steps, 1)
        if self.budget:
            done = max(done, self.state.train_seconds / self.budget)
        return min(1.0, done)

    def accumulation(self) -> int:
        """Micro-batches per rank in the next step: ``grad_accum``, or a linear ramp up to it
        (``batch_ramp``), on the elapsed fraction of the budget, of ``max_steps``, or else of the
        micro-batches that ``epochs`` plan (so the smaller early steps still cover every epoch)."""
        train = self.config.train
        if self.budget or train.max_steps > 0:
            done = self.fraction()
        else:
            consumed = sum(self._epoch_sizes[:self.state.epoch]) + math.ceil(
                self.state.batch_in_epoch / self.world_size)
            done = min(1.0, consumed / max(self._planned_batches, 1))
        return ramp_accumulation(train.grad_accum, done, train.batch_ramp)

    # -- faults: signals, non-finite steps, out of memory --------------------------------------
    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGTERM, SIGHUP and the first Ctrl-C stop at the step's end with a checkpoint; a second Ctrl-C
        at once."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        import signal

        name = signal.Signals(signum).name
        if self._stop_signal and signum == signal.SIGINT:  # a second Ctrl-C: the user will not wait
            self._interrupt_now = True
            raise KeyboardInterrupt
        self._stop_signal = self._stop_signal or name
        if self.is_main:  # straight to stderr: a log call inside a signal handler could deadlock
            import sys

            # A hung-up terminal (SIGHUP) or a re-entered stream must not turn the stop into a crash.
            with contextlib.suppress(OSError, RuntimeError):
                print(f"\n  {name}: stopping after this step with a checkpoint"
                      + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""), file=sys.stderr)

    def _agree_across_ranks(self) -> str | None:
        """Under several processes, make every rank see the same clock and the same stop signal.

        Each rank reads its own clock, and a signal reaches them at different moments: left alone,
        one rank could stop on the budget (or set a different LR or accumulation) while another
        starts a step whose all-reduce then never completes. The slowest clock and any rank's stop
        request win. Returns the signal to stop for at this step's end, if any.
        """
        if self.world_size == 1:
            return self._stop_signal
        seconds, stop = self.strategy.all_reduce([self.state.train_seconds, bool(self._stop_signal)], "max")
        self.state.train_seconds = seconds
        return (self._stop_signal or "SIGTERM") if stop else None

    def _stop_for_signal(self, name: str) -> None:
        if self._saved_step != self.state.step:  # the step may just have been saved for --save-every
            self._save()
        raise RunStopped(f"{name}: stopped at step {self.state.step} with a checkpoint; continue with: "
                         f"{self.resume_command()}", exit_code=0)

    def _check_finite(self) -> None:
        limit = self.config.train.nonfinite_limit
        streak = self.state.nonfinite_streak
        if streak and self.is_main:
            log.warning(f"  step {self.state.step}: loss or gradient not finite; the update was skipped "
                        f"({self.state.skipped_steps} skipped so far)")
        if streak >= limit:
            self._save()  # the weights are the last finite ones
            fp32 = "" if self.precision == "fp32" else ", --precision fp32"
            raise RunStopped(f"the loss or gradient was not finite for {streak} steps in a row (to step "
                             f"{self.state.step}); stopped with a checkpoint of the last finite weights. A resumed "
                             f"run keeps its settings: train again with a lower --lr, more warmup{fp32} or a "
                             f"smaller grad_clip (--overwrite, or --init {self.run_dir or 'RUN'}/checkpoints/"
                             f"step-{self.state.step:08d} to keep the progress)", exit_code=1)

    def _oom_message(self) -> str:
        train = self.config.train
        from kiln.estimate import run_memory_bytes

        longest = int(self.sampler.lengths.max())
        per_batch = train.batch_size or max(1, min(train.max_batch_size, train.batch_tokens // max(longest, 1)))
        need_bytes = run_memory_bytes(self.model, self.config.optim.name, self.precision, longest, per_batch,
                                      train.grad_checkpoint) / self.strategy_shards()
        need = f"kiln estimates {need_bytes / 2**30:.1f} GiB per GPU for this run; "
        return (f"CUDA out of memory at step {self.state.step + 1}; {need}try --batch-tokens "
                f"{max(train.batch_tokens // 2, 1)} with --grad-accum {train.grad_accum * 2} (the same "
                "effective batch), --precision bf16, --grad-checkpoint, --fsdp on several GPUs, or "
                "--auto-batch to split micro-batches automatically")

    def strategy_shards(self) -> int:
        """Over how many processes the weights and optimizer state are split (FSDP), for estimates."""
        return self.world_size if self.strategy.sharded else 1

    def resume_command(self) -> str:
        """The command line that continues this run."""
        meta, run = self.kiln_meta, self.run_dir
        if run is None:
            return "kiln train ... --resume"
        words = ["kiln", "train", meta.get("task", self.task.name), str(meta.get("data", "DATA")), "-n", run.name,
                 "--output-dir", str(run.parent), "--resume"]
        if self.world_size > 1:
            words += ["--nproc", str(self.world_size)]
        return shlex.join(words)

    def _set_lr(self) -> None:
        schedule = self.config.schedule
        if self.budget:  # the schedule runs on the elapsed fraction of the budget, not on steps
            warmup = 0.0 if schedule.warmup_steps else schedule.warmup_ratio
            multiplier = lr_at_fraction(schedule.name, self.fraction(), warmup)
            if schedule.warmup_steps and self.state.step < schedule.warmup_steps:  # warmup counted in steps
                multiplier *= (self.state.step + 1) / schedule.warmup_steps
        else:
            multiplier = lr_multiplier(schedule.name, self.state.step, self.total_steps, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.optim.lr * multiplier

    # -- evaluation, checkpoints, logging ----------------------------------------------------
    def _evaluate_and_checkpoint(self) -> None:
        self.state.last_eval_step = self.state.step
        if not self.eval_features:
            self._save()
            return
        metrics = self.evaluate()
        self.last_metrics = metrics
        value = metrics.get(self.metric)
        if value is None:
            raise KilnError(f"setting 'train.metric': '{self.metric}' is not one of {', '.join(sorted(metrics))}")
        better = self.task.greater_is_better(self.metric)
        best = self.state.best_metric
        # Ties on the metric (common for accuracy on small sets) go to the lower validation loss.
        improved = math.isfinite(value) and (
            best is None or not math.isfinite(best) or (value > best if better else value < best)
            or (value == best and metrics["loss"] < self.state.best_loss))
        if improved:
            self.state.best_metric = value
            self.state.best_loss = metrics["loss"]
            self.state.best_step = self.state.step
            self.state.evals_without_improvement = 0
        else:
            self.state.evals_without_improvement += 1
        self._log({"step": self.state.step, "split": "validation",
                   **{f"eval_{k}": v for k, v in metrics.items()}})
        shown = metrics_line(metrics)
        self._say(f"  eval step {self.state.step}: {shown}{'  (best)' if improved else ''}")
        if improved:
            self.best_metrics = metrics
            self._save(best=True)
        self._save()
        patience = self.config.train.patience
        if patience and self.state.evals_without_improvement >= patience:
            self._say(f"  early stop: no {self.metric} improvement in {patience} evaluations")
            self.should_stop = True
        self._call("on_evaluate", metrics)

    def _save_due(self) -> bool:
        if self.save_steps and self.state.step % self.save_steps == 0:
            return True
        # train_seconds is the same on every rank (agreed each step), so they all decide alike
        return bool(self.save_seconds) and self.state.train_seconds - self.state.last_save_seconds >= self.save_seconds

    def _save(self, best: bool = False) -> None:
        """Write a checkpoint: ``best``, or the step's resumable one (then keep the newest
        ``keep_last``). Every rank takes part (FSDP gathers the full state); rank 0 writes."""

        self.state.last_save_seconds = self.state.train_seconds
        self._saved_step = self.state.step if not best else self._saved_step
        if not best:  # the window's loss so far (all ranks'), so that a resumed run logs the same line
            self.state.window["loss"] += self._fold_window_loss()
        weights = self.strategy.model_state(self.model)
        optimizer = None if best else self.strategy.optimizer_state(self.model, self.optimizer)
        # Every rank's random state (dropout draws differ by rank), so that each resumes its own.
        rng = {} if best else self._rng_states()
        if self.run_dir is None or not self.is_main:
            return
        checkpoints = self.run_dir / "checkpoints"
        meta = {**self.kiln_meta, "step": self.state.step}
        state = asdict(self.state)
        state.update(world_size=self.world_size, grad_accum=self.config.train.grad_accum)
        if best:
            meta["metrics"] = self.last_metrics
            ckpt.save_checkpoint(checkpoints / "best", self.model, self.tokenizer, meta, trainer_state=state,
                                 weights=weights, files=self.task.model_files())
            return
        if self.scaler is not None:  # fp16's loss scale: resuming without it would re-learn it
            state["grad_scaler"] = self.scaler.state_dict()
        path = ckpt.step_checkpoint_path(checkpoints, self.state.step)
        ckpt.save_checkpoint(path, self.model, self.tokenizer, meta, optimizer=optimizer, trainer_state=state,
                             rng=rng, weights=weights, files=self.task.model_files())
        self._written.add(path)  # pruning trusts these instead of hashing every kept one at every save
        ckpt.prune_checkpoints(checkpoints, self.config.train.keep_last, self._written)

    def _rng_states(self) -> dict:
        """``torch`` (and ``cuda``) random states: rank 0's under those names, rank r's as ``torch.rank{r}``
        (a collective under several processes)."""
        import torch

        own = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            own["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world_size == 1:
            return own
        states = dict(own)
        for rank, theirs in enumerate(self.strategy.gather({k: v.cpu() for k, v in own.items()})):
            if rank:
                states.update({f"{k}.rank{rank}": v for k, v in theirs.items()})
        return states

    def _checkpoint_to_resume(self) -> Path | None:
        meta = self.kiln_meta
        belongs = ckpt.same_run(meta) if {"task", "config"} <= meta.keys() else None
        path = ckpt.last_checkpoint(self.run_dir / "checkpoints", belongs=belongs) if self.run_dir else None
        if path is None:
            self._say("  no checkpoint to resume from; starting from step 0")
        return path

    def _restore(self, path: Path) -> None:
        """Continue from checkpoint ``path`` (weights are already loaded): optimizer, state, RNG, and
        the metrics file cut back to what the checkpoint had seen."""
        import torch

        state, tensors, rng = ckpt.load_checkpoint_state(path)
        self.strategy.load_optimizer_state(self.model, self.optimizer,
                                           ckpt.optimizer_state_dict(tensors, state.pop("optimizer")))
        scaler_state = state.pop("grad_scaler", None)
        if scaler_state and self.scaler is not None:
            self.scaler.load_state_dict(scaler_state)
        self.state = TrainerState.from_saved(state, path / ckpt.STATE_FILE)
        self._keep_global_batch()
        # A run resumed after it had stopped early (patience, budget) stops again, not one step later.
        patience, resumed = self.config.train.patience, self.state
        self.should_stop = bool(patience and resumed.evals_without_improvement >= patience) or bool(
            self.budget and resumed.train_seconds >= self.budget)
        best = path.parent / "best" / ckpt.KILN_FILE
        if best.is_file():
            self.best_metrics = json.loads(best.read_text()).get("metrics", {})
        # This rank's own state when the checkpoint has it (saved at the same number of processes).
        suffix = f".rank{self.rank}" if self.rank and f"torch.rank{self.rank}" in rng else ""
        if "torch" in rng:
            torch.set_rng_state(rng["torch" + suffix])
        if "cuda" + suffix in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda" + suffix], self.device)
        if self.is_main and self.run_dir is not None:
            _cut_metrics(self.run_dir / "metrics.jsonl", self.state.step,
                         evaluated=self.state.last_eval_step == self.state.step)
        self._say(f"  resumed   step {self.state.step} (epoch {self.state.epoch}, "
                  f"micro-batch {self.state.batch_in_epoch}) from {path.name}")

    def _keep_global_batch(self) -> None:
        """At another number of processes than the checkpoint's, scale grad_accum so that each step
        still takes as many micro-batches (the global batch, and so the run, stay the same)."""
        saved = self.state.world_size
        accum = self.state.grad_accum or self.config.train.grad_accum
        if saved == self.world_size:
            return
        if (saved * accum) % self.world_size:
            raise KilnError(f"the checkpoint's steps take {saved * accum} micro-batches ({saved} processes x "
                            f"grad_accum {accum}), which {self.world_size} processes cannot share evenly; "
                            f"resume with a number of processes that divides {saved * accum}")
        self.config.train.grad_accum = saved * accum // self.world_size
        self._say(f"  resumed at {self.world_size} processes instead of {saved}: grad_accum "
                  f"{self.config.train.grad_accum} keeps the global batch of {saved * accum} micro-batches")

    def _log(self, record: dict) -> None:
        """Hand a record (a training window or an evaluation) to the reporters, on the main rank."""
        if self.is_main:
            self._call("on_log", record)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _say(self, text: str, level: int = logging.INFO) -> None:
        if self.is_main:
            log.log(level, text)


def _split(ids: list[int], pieces: int) -> list[list[int]]:
    """``ids`` in up to ``pieces`` consecutive, non-empty parts."""
    if pieces <= 1:
        return [ids]
    size = -(-len(ids) // pieces)
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: float) -> float | None:
    """``value``, or None (JSON null) for NaN and infinities, which strict JSON readers refuse."""
    return value if math.isfinite(value) else None


def _cut_metrics(path: Path, step: int, evaluated: bool = True) -> None:
    """Drop the records a resumed run will write again (those after its checkpoint's ``step``, and the
    evaluation at ``step`` when the checkpoint was saved before it), and a last line a kill cut short,
    so the file ends as an uninterrupted run's would."""
    if not path.is_file():
        return
    kept = []
    lines = path.read_bytes().splitlines()
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if number == len(lines):  # a kill cut the last line short: the resumed run writes it again
                continue
            what = "not UTF-8" if isinstance(err, UnicodeDecodeError) else "not a JSON record"
            raise KilnError(f"{what}; {DAMAGED}", path, number) from None
        # The test split's record is written after training, by the export: a resumed run writes it again.
        if not isinstance(record, dict) or record.get("split") == "test":
            continue
        at = record.get("step", 0)
        if not isinstance(at, int) or isinstance(at, bool) or at < 0:
            raise KilnError(f"'step' is {at!r}, not a step number; {DAMAGED}", path, number)
        if at < step or (at == step and (evaluated or record.get("split") != "validation")):
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))
