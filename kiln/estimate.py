"""``kiln estimate``: parameters, memory and compute of a profile, without allocating it.

The model is built on the meta device, so parameter counts are exact (tied weights once) for any
profile, T5-efficient names included. Memory follows the usual mixed-precision accounting: fp32
weights, gradients and optimizer state, low-precision weight copies under autocast, and an
activation estimate from depth, width, sequence length and batch. MB are 10^6 bytes, as model
cards use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.config import OPTIMIZERS, Config
from kiln.errors import KilnError

# fp32 copies of the weights each optimizer keeps (adafactor: factored, see optimizer_bytes)
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "radam": 2, "adafactor": None}


@dataclass
class Shape:
    """The dimensions the activation and FLOP formulas need."""

    layers: int  # encoder + decoder layers
    decoder_layers: int
    hidden: int
    ffn: int
    heads: int
    attention_width: int  # heads x key/value size
    gated: bool = False  # a gated feed-forward (GEGLU: T5 v1.1, ModernBERT/crammed-BERT)


def shape_of(config: Any) -> Shape:
    """Read the dimensions from any HF config (BERT, DistilBERT, GPT-2, BART, T5 …)."""
    def first(*names: str, default: Any = None) -> Any:
        for name in names:
            value = getattr(config, name, None)
            if value:
                return value
        return default

    hidden = first("hidden_size", "d_model", "n_embd", "dim")
    encoder = first("num_layers", "encoder_layers", "n_layer", "n_layers", "num_hidden_layers")
    decoder = first("num_decoder_layers", "decoder_layers", default=0) if getattr(config, "is_encoder_decoder", False) \
        else 0
    heads = first("num_heads", "encoder_attention_heads", "n_head", "n_heads", "num_attention_heads")
    ffn = first("intermediate_size", "d_ff", "encoder_ffn_dim", "n_inner", "hidden_dim", default=4 * hidden)
    head_size = first("d_kv", default=hidden // heads)
    gated = bool(getattr(config, "is_gated_act", False)) or getattr(config, "model_type", "") == "modernbert"
    return Shape(encoder + decoder, decoder, hidden, ffn, heads, heads * head_size, gated)


def parameter_counts(model: Any) -> dict[str, int]:
    """Total, embedding (token, position, type tables) and non-embedding parameters, each tensor once."""
    import torch

    seen: set[int] = set()
    total = embedding = 0
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            # T5's relative attention bias is an Embedding module but part of attention, not the input.
            if isinstance(module, torch.nn.Embedding) and "relative_attention_bias" not in name:
                embedding += param.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def optimizer_bytes(model: Any, optimizer: str) -> int:
    """Optimizer state: AdamW/Adam/RAdam keep two fp32 moments; Adafactor factors matrices."""
    if optimizer == "adafactor":
        total = 0
        for param in {id(p): p for p in model.parameters()}.values():
            total += 4 * (param.shape[0] + param.shape[1:].numel() if param.ndim >= 2 else param.numel())
        return total
    if optimizer not in OPTIMIZERS:
        raise KilnError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got '{optimizer}'")
    states = OPTIMIZER_STATES[optimizer]
    assert states is not None  # adafactor's is worked out above
    return 4 * states * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def activation_bytes(shape: Shape, seq_len: int, batch_size: int, precision: str,
                     grad_checkpoint: bool = False) -> int:
    """Activations kept for the backward pass (after Korthikanti et al., 2022), with fused attention.

    Per layer and token: the inputs of the two LayerNorms, of the Q/K/V and feed-forward
    projections and the residual stream (``7 h``); Q, K, V and the attention output, each ``a``
    wide (heads x key size, which T5-xl/xxl make 4-16 x h); the activation-function input and
    output (``2 ffn``; a gated feed-forward keeps both halves and their product, ``4 ffn``). Fused
    (SDPA) attention keeps no seq x seq matrix. Decoder layers add cross-attention (``h + 4 a``).
    Autocast stores them in 16 bits, fp32 in 32. With activation checkpointing each layer keeps only
    its input (``h``) and one layer's activations at a time are recomputed in the backward pass.
    """
    h, a = shape.hidden, shape.attention_width
    per_layer = 7 * h + 4 * a + (4 if shape.gated else 2) * shape.ffn
    per_token = shape.layers * per_layer + shape.decoder_layers * (h + 4 * a)
    if grad_checkpoint:
        per_token = (shape.layers + shape.decoder_layers) * h + per_layer + (h + 4 * a if shape.decoder_layers else 0)
    width = 2 if precision in ("bf16", "fp16") else 4
    return per_token * seq_len * batch_size * width


def training_flops_per_token(non_embedding: int, shape: Shape, seq_len: int) -> int:
    """Model FLOPs to train on one token, in PaLM's MFU accounting (Chowdhery et al., 2022, app. B).

    6 per non-embedding parameter (forward 2, backward 4), plus the attention scores and mixing
    (``Q K^T`` and ``A V``: 2 x 2 x seq x attention width forward per layer, x 3 with backward).
    Embedding lookups are free; recomputation (activation checkpointing) is not model FLOPs.
    """
    return 6 * non_embedding + 12 * shape.layers * seq_len * shape.attention_width


def estimate(
    profile: str,
    task: str | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    precision: str = "fp32",
    optimizer: str | None = None,
    peak_tflops: float | None = None,
    mfu: float = 0.4,
    overrides: list[str] | tuple[str, ...] = (),
    grad_checkpoint: bool = False,
) -> dict:
    """Everything ``kiln estimate`` reports, as a dict."""
    import torch
    from transformers import AutoModel

    from kiln.models import architecture_errors, hf_config, max_positions
    from kiln.profiles import builder_for
    from kiln.tasks import task_class

    for name, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--batch-tokens", batch_tokens),
                        ("--peak-tflops", peak_tflops), ("--mfu", mfu)):
        if value is not None and value <= 0:
            raise KilnError(f"{name} must be positive, got {value}")
    config: Config = builder_for(profile, {}, overrides).build()
    _check_task(task, config)
    with architecture_errors(config.name), torch.device("meta"):
        architecture = hf_config(config.model.type, config.model.config)
        model = AutoModel.from_config(architecture)
    counts = parameter_counts(model)
    shape = shape_of(architecture)
    if not seq_len:  # what training would use: a pretraining block, else up to 128 tokens
        pretraining = task is not None and task_class(task).pretraining
        seq_len = config.pretrain.seq_len if pretraining else min(128, max_positions(architecture))
    if batch_size is None:
        batch_size = _batch_size(config, seq_len, batch_tokens)
    optimizer = optimizer or config.optim.name
    total = counts["total"]
    memory = memory_bytes(model, shape, optimizer, precision, seq_len, batch_size, grad_checkpoint)
    flops_per_token = training_flops_per_token(counts["non_embedding"], shape, seq_len)
    result = {
        "profile": config.name,
        "parameters": counts,
        "weights_mb": {"fp32": round(4 * total / 1e6, 2), "fp16": round(2 * total / 1e6, 2)},
        "training": {"precision": precision, "optimizer": optimizer, "seq_len": seq_len, "batch_size": batch_size,
                     "grad_checkpoint": grad_checkpoint,
                     "memory_mb": {k: round(v / 1e6, 2) for k, v in memory.items()}},
        "flops_per_token": flops_per_token,
    }
    if peak_tflops:
        seconds = 1e6 * flops_per_token / (peak_tflops * 1e12 * mfu)
        result["seconds_per_million_tokens"] = round(seconds, 2)
        result["peak_tflops"], result["mfu"] = peak_tflops, mfu
    return result


def _check_task(task: str | None, config: Config) -> None:
    from kiln.tasks import TASKS

    if task is not None and task not in TASKS:
        raise KilnError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    if task is not None and task not in config.tasks:
        raise KilnError(f"profile '{config.name}' does not support task '{task}' ({', '.join(config.tasks)})")


def _batch_size(config: Config, seq_len: int, batch_tokens: int | None) -> int:
    """The batch size training would use: the profile's fixed one, else its token budget's."""
    if config.train.batch_size and not batch_tokens:
        return config.train.batch_size
    budget = batch_tokens or config.train.batch_tokens
    return max(1, min(config.train.max_batch_size, budget // seq_len))


def memory_bytes(model: Any, shape: Shape, optimizer: str, precision: str, seq_len: int, batch_size: int,
                 grad_checkpoint: bool = False) -> dict[str, int]:
    """Training memory by part (weights, gradients, optimizer, activations, 16-bit copies) and in total."""
    total = parameter_counts(model)["total"]
    memory = {
        "weights": 4 * total,
        "gradients": 4 * total,
        "optimizer": optimizer_bytes(model, optimizer),
        "activations": activation_bytes(shape, seq_len, batch_size, precision, grad_checkpoint),
        "mixed_precision_copies": 2 * total if precision in ("bf16", "fp16") else 0,
    }
    memory["total"] = sum(memory.values())
    return memory


def run_memory_bytes(model: Any, optimizer: str, precision: str, seq_len: int, batch_size: int,
                     grad_checkpoint: bool = False) -> int:
    """Training memory of a built model at one micro-batch shape, as :func:`estimate` counts it."""
    return memory_bytes(model, shape_of(model.config), optimizer, precision, seq_len, batch_size,
                        grad_checkpoint)["total"]
