"""The one training loop, shared by every task.

It reads top to bottom: set up, (resume,) then for each optimizer step take ``grad_accum``
micro-batches, run :meth:`Trainer.training_step`, log, evaluate, checkpoint. Tasks plug in through
the :class:`~kiln.tasks.base.Task` interface; behaviour plugs in by overriding ``compute_loss``,
``training_step``, ``evaluate`` or ``predict``, or through :class:`Callback` objects.

Rank-aware: under ``torchrun`` (``WORLD_SIZE > 1``) every rank takes its own share of batches,
the model is wrapped in DDP, and only rank 0 prints or writes files.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.config import Config, parse_duration
from kiln.errors import KilnError
from kiln.models import keep_in_fp32, set_dropout
from kiln.training import checkpoint as ckpt
from kiln.training.batching import TokenBudgetSampler, feature_lengths
from kiln.training.callbacks import Callback, ProgressCallback, duration
from kiln.training.device import autocast, resolve_device, resolve_precision
from kiln.training.inference import run_inference, to_device
from kiln.training.optim import (
    build_optimizer,
    lr_at_fraction,
    lr_multiplier,
    planned_steps,
    ramp_accumulation,
    warmup_steps,
)


@dataclass
class TrainerState:
    """Where training stands; saved as JSON in every checkpoint so resuming is exact."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float | None = None
    best_loss: float = float("inf")
    best_step: int = -1
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    tokens_seen: int = 0
    examples_seen: int = 0
    train_seconds: float = 0.0


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
        self.callbacks = [ProgressCallback(), *callbacks]
        self.kiln_meta = kiln_meta or {}
        self.description = description or {}
        self.state = TrainerState()
        self.should_stop = False
        self.step_loss: Any = 0.0  # the last step's mean loss (a device tensor: read it rarely)
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.is_main = self.rank == 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.last_metrics: dict = {}
        self.best_metrics: dict = {}
        self._interrupt_requested = False  # set by the first Ctrl-C, acted on at the next step boundary
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
    def setup(self) -> None:
        """Device, precision, distributed wrapping, optimizer and step count."""
        import torch

        train = self.config.train
        self.device = resolve_device(train.device)
        self.precision = resolve_precision(train.precision, self.device)
        if train.dropout is not None:
            set_dropout(self.model, train.dropout)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model.to(self.device)
        # What the loop calls: the model, or a task's wrapper around it (sharing its parameters).
        self.module = self.task.training_module(self.model)
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=device_ids)
        self.optimizer = build_optimizer(self.model, self.config.optim, self.device.type)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.budget = parse_duration(train.budget)
        self._epoch_sizes, self._planned_batches = self._planned_micro_batches()
        self.total_steps = self._total_steps()
        self.warmup = warmup_steps(self.config.schedule, self.total_steps)
        self.metric = self.config.train.metric or self.task.main_metric
        log.debug(f"set-up: {self.total_steps} steps ({self.warmup} warmup), {len(self._epoch_sizes)} epochs of "
                  f"{self._epoch_sizes} micro-batches, {type(self.optimizer).__name__}, best by {self.metric}, "
                  f"rank {self.rank} of {self.world_size}")

    def _planned_micro_batches(self) -> tuple[list[int], int]:
        """Micro-batches in each epoch that ``train.epochs`` covers, and how many of them to train."""
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
            return sys.maxsize
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
        batch, so accumulating k micro-batches gives the same gradient as one k-times-larger batch.
        Returns the detached mean loss per unit.
        """
        import contextlib

        import torch

        self.module.train()
        units = sum(self.task.loss_units(b) for b in micro_batches)
        if self.world_size > 1:  # DDP averages gradients over ranks; normalise by the global count
            units = self._all_reduce([units], "sum")[0] / self.world_size
        units = max(units, 1)
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            batch = to_device(batch, self.device)
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.world_size == 1 else self.module.no_sync()
            with sync:
                loss = self.compute_loss(self.module, batch) / units
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        self._set_lr()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def evaluate(self, features: list[dict] | None = None, dataset: Any = None) -> dict:
        """Loss and task metrics on ``features`` (default: the validation set)."""
        features = self.eval_features if features is None else features
        dataset = self.eval_dataset if dataset is None else dataset
        outputs, loss_sum, units = self.predict(features)
        predictions = self.task.decode(outputs, features, dataset)
        metrics = self.task.metrics(predictions, dataset)
        metrics["loss"] = loss_sum / max(units, 1)
        metrics.update(self.task.loss_metrics(metrics["loss"]))
        metrics["n"] = len(dataset)
        return metrics

    def predict(self, features: list[dict]) -> tuple[list[Any], float, int]:
        """Per-feature outputs in input order, plus the loss sum and units when labelled."""
        return run_inference(self.model, self.task, features, device=self.device, precision=self.precision,
                             batch_tokens=self.config.train.batch_tokens * 2,
                             max_batch_size=self.config.train.max_batch_size * 2, pad_id=self.pad_id)

    # -- the loop ----------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        """Run training to the end (or early stop).

        Returns the validation metrics of the best checkpoint, the model that is exported.
        """
        import signal
        import threading

        import torch

        clock = time.perf_counter()  # a budget counts set-up (and any compile warm-up) too
        self.setup()
        if resume:
            self._restore()
        self._print_summary()
        for callback in self.callbacks:
            callback.on_train_begin(self)
        train = self.config.train
        window_loss = torch.zeros((), device=self.device)
        window_steps = 0
        window_start = time.perf_counter()
        window_tokens = window_examples = 0
        started = clock - self.state.train_seconds
        eta_printed = self.state.step > 0
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGINT, self._on_interrupt)
        try:
            while self.state.step < self.total_steps and not self.should_stop:
                batches = self.sampler.batches(self.state.epoch)
                while self.state.batch_in_epoch < len(batches) and self.state.step < self.total_steps:
                    accumulate = self.accumulation()
                    chunk = batches[self.state.batch_in_epoch:self.state.batch_in_epoch + accumulate]
                    micro = [self.task.collate_training([self.train_features[i] for i in ids], self.pad_id,
                                                        self.state.epoch) for ids in chunk]
                    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                                 else b["input_ids"].numel() for b in micro)
                    examples = sum(len(ids) for ids in chunk)
                    self.step_loss = self.training_step(micro)
                    window_loss += self.step_loss
                    window_steps += 1
                    window_tokens += tokens
                    window_examples += examples
                    self.state.step += 1
                    self.state.batch_in_epoch += len(chunk)
                    self.state.tokens_seen += tokens
                    self.state.examples_seen += examples
                    self.state.train_seconds = time.perf_counter() - started
                    stop_requested = self._agree_across_ranks()
                    logs = None
                    out_of_time = bool(self.budget) and self.state.train_seconds >= self.budget
                    if (self.state.step % train.log_every == 0 or self.state.step == self.total_steps
                            or out_of_time):  # the last step of a budget run is always logged
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        loss, tokens, examples, seen = self._all_ranks(
                            window_loss.item(), window_tokens, window_examples, self.state.tokens_seen)
                        logs = {"step": self.state.step, "epoch": round(self._epoch_progress(len(batches)), 4),
                                "loss": loss / window_steps,
                                "lr": self.optimizer.param_groups[0]["lr"],
                                "tokens_per_s": tokens / elapsed,
                                "examples_per_s": examples / elapsed,
                                "tokens": seen,
                                "elapsed": self.state.train_seconds}
                        self._log(logs)
                        window_loss.zero_()
                        window_steps = window_tokens = window_examples = 0
                        window_start = time.perf_counter()
                    if out_of_time:
                        self._say(f"  budget    {duration(self.budget)} spent at step {self.state.step}")
                        self.should_stop = True
                    if not eta_printed and self.state.step == min(10, self.total_steps) and not self.budget:
                        eta_printed = True
                        per_step = self.state.train_seconds / self.state.step
                        self._say(f"  ETA       {duration(per_step * (self.total_steps - self.state.step))}"
                                  f" for {self.total_steps} steps (timed over the first {self.state.step})")
                    for callback in self.callbacks:
                        callback.on_step_end(self, logs)
                    if train.eval_every and self.state.step % train.eval_every == 0:
                        self._evaluate_and_checkpoint()
                    if stop_requested or (self.world_size == 1 and self._interrupt_requested):
                        raise KeyboardInterrupt  # at a step boundary: the checkpoint below is consistent
                    if self.should_stop:
                        break
                if self.state.batch_in_epoch >= len(batches):
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    if not train.eval_every and not self.should_stop:
                        self._evaluate_and_checkpoint()
            if self.state.last_eval_step != self.state.step:
                self._evaluate_and_checkpoint()
        except KeyboardInterrupt:
            for callback in self.callbacks:
                callback.on_train_end(self)
            if self._interrupt_now:  # mid-step: the weights and the step count may disagree
                self._say(f"interrupted during step {self.state.step + 1}; not saved: --resume continues "
                          "from the last checkpoint", logging.WARNING)
            else:
                self._save("last")
                self._say(f"interrupted at step {self.state.step}; continue with --resume", logging.WARNING)
            raise
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        for callback in self.callbacks:
            callback.on_train_end(self)
        return self.best_metrics or self.last_metrics

    def _epoch_progress(self, batches_in_epoch: int) -> float:
        return self.state.epoch + self.state.batch_in_epoch / max(batches_in_epoch, 1)

    def fraction(self) -> float:
        """How much of training is done: steps done/total or, with a budget, elapsed/budget, whichever
        is further along (with both, training stops on whichever ends first, and so do the schedules)."""
        done = self.state.step / max(self.total_steps, 1)
        if self.budget:
            done = max(done, self.state.train_seconds / self.budget)
        return min(1.0, done)

    def accumulation(self) -> int:
        """Micro-batches in the next step: ``grad_accum``, or a linear ramp up to it (``batch_ramp``).

        The ramp runs on the elapsed fraction of the budget, of ``max_steps``, or else of the
        micro-batches that ``epochs`` plan (so the smaller early steps still cover every epoch).
        """
        train = self.config.train
        if self.budget or train.max_steps > 0:
            done = self.fraction()
        else:
            consumed = sum(self._epoch_sizes[:self.state.epoch]) + self.state.batch_in_epoch
            done = min(1.0, consumed / max(self._planned_batches, 1))
        return ramp_accumulation(train.grad_accum, done, train.batch_ramp)

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self._interrupt_requested:  # a second Ctrl-C: the user will not wait for the step
            self._interrupt_now = True
            raise KeyboardInterrupt
        self._interrupt_requested = True
        self._say("\n  stopping after this step (saves a checkpoint; Ctrl-C again to stop at once)")

    def _agree_across_ranks(self) -> bool:
        """Under torchrun, make every rank see the same clock and the same Ctrl-C.

        Each rank reads its own clock, and a signal reaches them at different moments: left alone,
        one rank could stop on the budget (or set a different LR or accumulation) while another
        starts a step whose all-reduce then never completes. The slowest clock and any rank's stop
        request win. Returns whether to stop for an interrupt at this step's end.
        """
        if self.world_size == 1:
            return False
        seconds, interrupted = self._all_reduce([self.state.train_seconds, self._interrupt_requested], "max")
        self.state.train_seconds = seconds
        return bool(interrupted)

    def _all_ranks(self, loss: float, tokens: int, examples: int, seen: int) -> tuple[float, int, int, int]:
        """The logged figures of the whole job: tokens and examples summed over ranks, and the loss
        averaged (each rank's loss is its share of the global sum, scaled by the world size)."""
        if self.world_size == 1:
            return loss, tokens, examples, seen
        loss, tokens, examples, seen = self._all_reduce([loss, tokens, examples, seen], "sum")
        return loss / self.world_size, int(tokens), int(examples), int(seen)

    def _all_reduce(self, values: list[float], op: str) -> list[float]:
        """``values`` reduced over all ranks (``sum`` or ``max``), in one collective."""
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.tolist()

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
            self._save("last")
            return
        metrics = self.evaluate()
        self.last_metrics = metrics
        value = metrics.get(self.metric)
        if value is None:
            raise KilnError(f"setting 'train.metric': '{self.metric}' is not one of {', '.join(sorted(metrics))}")
        better = self.task.greater_is_better(self.metric)
        best = self.state.best_metric
        # Ties on the metric (common for accuracy on small sets) go to the lower validation loss.
        improved = (best is None or (value > best if better else value < best)
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
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")
        self._say(f"  eval step {self.state.step}: {shown}{'  (best)' if improved else ''}")
        if improved:
            self.best_metrics = metrics
            self._save("best")
        self._save("last")
        patience = self.config.train.patience
        if patience and self.state.evals_without_improvement >= patience:
            self._say(f"  early stop: no {self.metric} improvement in {patience} evaluations")
            self.should_stop = True
        for callback in self.callbacks:
            callback.on_evaluate(self, metrics)

    def _save(self, which: str) -> None:
        if self.run_dir is None or not self.is_main:
            return
        import torch

        path = self.run_dir / "checkpoints" / which
        meta = {**self.kiln_meta, "step": self.state.step}
        if which == "best":
            meta["metrics"] = self.last_metrics
            ckpt.save_checkpoint(path, self.model, self.tokenizer, meta, trainer_state=asdict(self.state))
            return
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = asdict(self.state)
        if self.scaler is not None:  # fp16's loss scale: resuming without it would re-learn it
            state["grad_scaler"] = self.scaler.state_dict()
        ckpt.save_checkpoint(path, self.model, self.tokenizer, meta, optimizer=self.optimizer,
                             trainer_state=state, rng=rng)

    def _restore(self) -> None:
        import torch

        path = ckpt.last_checkpoint(self.run_dir / "checkpoints") if self.run_dir else None
        if path is None:
            self._say("  no checkpoint to resume from; starting from step 0")
            return
        ckpt.load_weights(self.model, path)
        state, tensors, rng = ckpt.load_checkpoint_state(path)
        # load_state_dict moves the moment tensors onto the parameters' device and keeps Adam's
        # `step` counters where they are (on the CPU, so reading them costs no device sync).
        ckpt.restore_optimizer(self.optimizer, tensors, state.pop("optimizer"))
        scaler_state = state.pop("grad_scaler", None)
        if scaler_state and self.scaler is not None:
            self.scaler.load_state_dict(scaler_state)
        self.state = TrainerState(**state)
        best = path.parent / "best" / ckpt.KILN_FILE
        if best.is_file():
            self.best_metrics = json.loads(best.read_text()).get("metrics", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self._say(f"  resumed   step {self.state.step} (epoch {self.state.epoch}, "
                  f"batch {self.state.batch_in_epoch})")

    def _log(self, record: dict) -> None:
        if self.run_dir is None or not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
        for callback in self.callbacks:
            callback.on_log(self, record)

    def _say(self, text: str, level: int = logging.INFO) -> None:
        if self.is_main:
            log.log(level, text)

    def _print_summary(self) -> None:
        train = self.config.train
        params = sum(p.numel() for p in self.model.parameters())
        train_tokens = int(self.sampler.lengths.sum())  # computed once, in setup
        eval_tokens = int(feature_lengths(self.eval_features).sum())
        batch = (f"{train.batch_size} examples" if train.batch_size else f"{train.batch_tokens} tokens")
        accumulated = train.grad_accum * self.world_size
        d = self.description
        lines = [
            f"kiln train {d.get('task', self.task.name)} · {d.get('name', '')}",
            f"  profile   {d.get('profile', self.config.name)} ({d.get('init', 'from scratch')})",
            f"  model     {params / 1e6:.2f}M parameters on {self.device} in {self.precision}"
            + (f" ({note})" if self.precision != "fp32" and (note := keep_in_fp32(self.model)) else ""),
            f"  train     {len(self.train_features)} examples, {train_tokens} tokens",
            f"  valid     {len(self.eval_features)} examples, {eval_tokens} tokens",
            f"  batch     {batch} x {accumulated} (accumulation x ranks) per step, "
            f"{'budget ' + duration(self.budget) if self.budget else f'{self.total_steps} steps'}, "
            f"lr {self.config.optim.lr:g} ({self.config.schedule.name})",
        ]
        if d.get("head"):
            lines.insert(2, f"  new       {d['head']}")
        if self.run_dir:
            lines.append(f"  run       {self.run_dir}")
        self._say("\n".join(lines))
