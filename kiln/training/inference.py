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
                  batch_tokens: int, max_batch_size: int, pad_id: int) -> tuple[list[Any], float, int]:
    """Forward every feature once. Returns ``(outputs in feature order, loss sum, loss units)``.

    Loss is only computed when the features carry labels.
    """
    import torch

    sampler = TokenBudgetSampler(feature_lengths(features), batch_tokens=batch_tokens,
                                 max_batch_size=max_batch_size, shuffle=False)
    outputs: list[Any] = [None] * len(features)
    loss_sum = torch.zeros((), device=device)
    units = 0
    module = task.training_module(model)  # e.g. the sparse MLM head
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for indices in sampler.batches():
            batch = task.collate([features[i] for i in indices], pad_id)
            labelled = task.target_keys[0] in batch
            if labelled:
                units += task.loss_units(batch)
            batch = to_device(batch, device)
            result = None
            if labelled or task.outputs_need_forward:
                with autocast(device, precision):
                    result = module(**task.model_inputs(batch))
            if labelled:
                loss_sum += task.loss(result, batch)
            for i, value in zip(indices, task.outputs(result, batch, model), strict=True):
                outputs[i] = value
    model.train(was_training)
    return outputs, float(loss_sum), units
