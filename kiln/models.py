"""Building HF models from profiles, and facts about them (parameter counts, position limits)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from kiln.errors import KilnError

# Models whose position ids start after the padding index, so two positions are unusable.
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"}


def quiet_transformers() -> None:
    """Turn off transformers' per-call progress bars ("Loading weights") inside kiln's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def hf_config(model_type: str, architecture: dict, **extra: Any) -> Any:
    """``transformers.AutoConfig`` for ``model_type`` with the profile's architecture and ``extra``."""
    from transformers import AutoConfig

    architecture = {**architecture, **extra}
    if model_type == "modernbert" and "layer_types" not in architecture:
        # kiln trains short sequences: every layer attends globally (ModernBERT defaults to 2 of 3
        # layers with a 128-token sliding window).
        architecture["layer_types"] = ["full_attention"] * architecture.get("num_hidden_layers", 22)
    return AutoConfig.for_model(model_type, **architecture)


@contextlib.contextmanager
def architecture_errors(profile: str) -> Iterator[None]:
    """Turn transformers' validation of a config or a model's shapes (``hidden_size`` not a multiple
    of the heads, a bad ``layer_norm_eps`` type) into one-line errors naming the profile."""
    try:
        yield
    except ValueError as exc:
        raise KilnError(f"profile '{profile}' does not build a valid model: {str(exc).splitlines()[0]}") from None


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or name.endswith("pdrop")


def set_dropout(model: Any, p: float) -> None:
    """Set every dropout probability of ``model`` to ``p``, and record it in ``model.config``.

    Not all of them are ``nn.Dropout`` modules: T5's and BART's attention keep the probability as a
    float they pass to the functional dropout, and ModernBERT builds ``nn.Identity`` in place of a
    zero-probability dropout. The config is updated so that the saved model says what was trained.
    """
    from torch import nn

    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if _is_dropout_name(key) and isinstance(value, float):
                setattr(config, key, p)
    for module in list(model.modules()):
        if isinstance(module, nn.Dropout):
            module.p = p
            continue
        for name, value in list(vars(module).items()):
            if _is_dropout_name(name) and isinstance(value, float):
                setattr(module, name, p)
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Identity) and "drop" in name and p > 0:
                setattr(module, name, nn.Dropout(p))


# Modules that transformers computes wrongly in bf16/fp16, kept in fp32 under autocast:
# model_type -> (module class names, why). The rest of the model still runs in low precision.
FP32_MODULES: dict[str, tuple[tuple[str, ...], str]] = {
    # masked_fill(scores, finfo(query.dtype).min): the query is fp32 (fp32 bias added to a bf16
    # projection) while the scores are bf16, and float32's minimum overflows bf16 ("value cannot be
    # converted to type c10::BFloat16 without overflow").
    "deberta": (("DisentangledSelfAttention",), "attention in fp32: transformers' DeBERTa mask overflows bf16/fp16"),
    "deberta-v2": (("DisentangledSelfAttention",), "attention in fp32: transformers' DeBERTa mask overflows "
                                                   "bf16/fp16"),
}


def keep_in_fp32(model: Any) -> str | None:
    """Run the modules of ``model`` that :data:`FP32_MODULES` lists in fp32 even under autocast.

    Each listed module's forward gets autocast switched off and its floating inputs cast to fp32;
    in an fp32 run that changes nothing. Returns what was done, for the run summary, or None.
    The weights and the saved model are untouched.
    """
    import functools

    names, why = FP32_MODULES.get(getattr(model.config, "model_type", ""), ((), ""))
    patched = [m for m in model.modules() if type(m).__name__ in names and not getattr(m, "_kiln_fp32", False)]
    for module in patched:
        module.forward = functools.partial(_fp32_forward, module.forward)
        module._kiln_fp32 = True
    return why if names else None


def _fp32_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    import torch

    def up(value: Any) -> Any:
        return value.float() if torch.is_tensor(value) and value.is_floating_point() else value

    device = next((v.device.type for v in (*args, *kwargs.values()) if torch.is_tensor(v)), "cpu")
    with torch.autocast(device_type=device, enabled=False):
        return forward(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})


# CPU training in bf16 runs attention as matmuls and a softmax ("eager") when no training input is
# longer than this: on a 2-core AMX CPU (torch 2.13) a BERT layer's training step is ~20 % faster
# than with torch's CPU flash attention at 64-128 tokens (its backward is slow), equal at 256 and
# 1.5x slower at 512. fp32 and inference gain nothing from it, and GPUs have fast fused kernels.
EAGER_ATTENTION_MAX_LEN = 128


def training_attention(model: Any, device: Any, precision: str, longest: int) -> str | None:
    """Switch ``model`` to eager attention where that trains faster (see :data:`EAGER_ATTENTION_MAX_LEN`);
    returns ``"eager"`` when it did. The math is the same and nothing of it is saved."""
    if device.type != "cpu" or precision != "bf16" or longest > EAGER_ATTENTION_MAX_LEN:
        return None
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    try:
        model.set_attn_implementation("eager")
    except (ValueError, ImportError):  # a family without it keeps its attention
        return None
    return "eager"


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


# Encoders whose layers share BERT's module layout (attention.self.{query,key,value}, attention.output,
# feed_forward_chunk), so the first-token shortcut below is exact for them.
FIRST_TOKEN_TYPES = {"bert", "roberta", "xlm-roberta"}


def first_token_last_layer(model: Any) -> bool:
    """Compute the last encoder layer for the first token only, when only that token is read.

    Sequence classification reads the final hidden state at position 0 ([CLS]/<s>) alone. In the last
    layer, every other position's query, attention output and feed-forward are wasted work: about a
    fifth of a 4-layer model's FLOPs. The patched layer keeps keys/values for all tokens, so the
    result is the same as the full layer's at position 0. Returns whether the model was patched
    (weights and the saved model are untouched; transformers loads the export as usual).
    """
    import types

    config = model.config
    if config.model_type not in FIRST_TOKEN_TYPES or getattr(config, "is_decoder", False):
        return False
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not layers:
        return False
    layers[-1].forward = types.MethodType(_first_token_layer_forward, layers[-1])
    return True


def _first_token_layer_forward(layer: Any, hidden_states: Any, attention_mask: Any = None, *args: Any,
                               **kwargs: Any) -> Any:
    import torch.nn.functional as F

    attention = layer.attention.self
    batch, length, _ = hidden_states.shape
    head = attention.attention_head_size
    first = hidden_states[:, :1]  # (B, 1, H)
    query = attention.query(first).view(batch, 1, -1, head).transpose(1, 2)  # (B, nh, 1, hs)
    key = attention.key(hidden_states).view(batch, length, -1, head).transpose(1, 2)  # (B, nh, T, hs)
    value = attention.value(hidden_states).view(batch, length, -1, head).transpose(1, 2)
    mask = attention_mask[:, :, :1] if attention_mask is not None and attention_mask.dim() == 4 else attention_mask
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=attention.dropout.p if layer.training else 0.0,
        scale=attention.scaling,
    )  # (B, nh, 1, hs)
    context = context.transpose(1, 2).reshape(batch, 1, -1)
    return layer.feed_forward_chunk(layer.attention.output(context, first))  # (B, 1, H)
