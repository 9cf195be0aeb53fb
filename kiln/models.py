"""Building HF models from profiles, and facts about them (parameter counts, position limits)."""

from __future__ import annotations

from typing import Any

# Models whose position ids start after the padding index, so two positions are unusable.
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"}


def quiet_transformers() -> None:
    """Turn off transformers' per-call progress bars ("Loading weights") inside kiln's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def hf_config(model_type: str, architecture: dict, **extra: Any) -> Any:
    """``transformers.AutoConfig`` for ``model_type`` with the profile's architecture and ``extra``."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**architecture, **extra})


def max_positions(config: Any) -> int:
    """Longest input (in tokens) the model's position embeddings allow."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is None:
        return 512
    if getattr(config, "model_type", "") in OFFSET_POSITIONS:
        positions -= 2
    return int(positions)


def count_parameters(model: Any) -> int:
    """Parameters counted once each (tied weights are shared tensors)."""
    seen = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def base_model_parameters(model_type: str, architecture: dict) -> int:
    """Parameter count of the bare ``AutoModel`` for an architecture, built on the meta device."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(hf_config(model_type, architecture))
    return count_parameters(model)
