"""Batched inference over features: length-sorted token-budget batches, results in input order."""

from __future__ import annotations

from typing import Any

from kiln.training.batching import TokenBudgetSampler, feature_lengths
from kiln.training.device import autocast


def to_device(batch: dict, device: Any) -> dict:
    """Move a CPU batch to ``device``; pinned, non-blocking copies on CUDA."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def run_inference(model: Any, task: Any, features: list[dict], *, device: Any, precision: str,
                  batch_tokens: int, max_batch_size: int, pad_id: int,
                  module: Any = None) -> tuple[list[Any], float, int]:
    """Forward every feature once. Returns ``(outputs in feature order, loss sum, loss units)``.

    Loss is only computed when the features carry labels. ``module``: what to call instead of the
    task's training module of ``model`` (e.g. its compiled form).
    """
    outputs, losses, units = run_inference_share(model, task, features, device=device, precision=precision,
                                                 batch_tokens=batch_tokens, max_batch_size=max_batch_size,
                                                 pad_id=pad_id, module=module)
    return outputs, sum(losses[b] for b in sorted(losses)), units


def run_inference_share(model: Any, task: Any, features: list[dict], *, device: Any, precision: str,
                        batch_tokens: int, max_batch_size: int, pad_id: int, share: tuple[int, int] = (0, 1),
                        lockstep: bool = False, module: Any = None) -> tuple[list[Any], dict[int, float], int]:
    """Forward the batches ``rank``, ``rank + world``, … (``share``) of the length-sorted batches one
    process would run. Returns the outputs (None for other ranks' features), each batch's loss sum by
    batch number and the loss units. With ``lockstep`` (sharded weights, whose forward is a
    collective) every rank runs equally many forwards: a rank out of batches repeats its last one
    and discards the result (or runs its first when it has none). ``module``: what to call, when not
    the task's :meth:`training_module` of ``model`` (sharded weights: the wrapper that gathers them).
    """
    import torch

    rank, world = share
    sampler = TokenBudgetSampler(feature_lengths(features), batch_tokens=batch_tokens,
                                 max_batch_size=max_batch_size, shuffle=False)
    batches = list(sampler.batches())
    mine = list(range(rank, len(batches), world))
    rounds = -(-len(batches) // world) if lockstep else len(mine)
    outputs: list[Any] = [None] * len(features)
    losses: dict[int, Any] = {}
    units = 0
    module = module if module is not None else task.training_module(model)  # e.g. the sparse MLM head
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for round_ in range(rounds):
            number = mine[round_] if round_ < len(mine) else None
            indices = batches[number if number is not None else (mine[-1] if mine else 0)]
            batch = task.collate([features[i] for i in indices], pad_id)
            labelled = task.target_keys[0] in batch
            if labelled and number is not None:
                units += task.loss_units(batch)
            batch = to_device(batch, device)
            result = None
            if labelled or task.outputs_need_forward:
                with autocast(device, precision):
                    result = module(**task.model_inputs(batch))
            values = task.outputs(result, batch, model)
            if number is None:
                continue
            if labelled:
                losses[number] = task.loss(result, batch)
            for i, value in zip(indices, values, strict=True):
                outputs[i] = value
    model.train(was_training)
    return outputs, {b: float(loss) for b, loss in losses.items()}, units
