"""``kiln estimate --profile P``: will this profile fit, and how long will it take?"""

from __future__ import annotations

import argparse
import json


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln estimate``."""
    from kiln.config import OPTIMIZERS
    parser = commands.add_parser(
        "estimate", help="parameters, memory and FLOPs of a profile, without allocating it",
        description="Estimate a profile's parameters, weight and training memory, training FLOPs per token "
                    "and time per million tokens. Nothing is allocated: the model is built on the meta device.",
    )
    parser.add_argument("--profile", required=True, help="profile name (T5-efficient names too) or YAML path")
    parser.add_argument("--task", help="check the profile supports this task")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: 128, capped by the model)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--batch-size", type=int, help="sequences per batch")
    group.add_argument("--batch-tokens", type=int, help="tokens per batch (default: the profile's)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="the training precision to size activations for (default: fp32)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS,
                        help="default: the profile's")
    parser.add_argument("--grad-checkpoint", action="store_true",
                        help="activation checkpointing: keep only each layer's input for the backward pass")
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak, for the time estimate")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    parser.add_argument("-c", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile setting, e.g. -c model.config.num_hidden_layers=2")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the estimate."""
    from kiln.estimate import estimate

    result = estimate(args.profile, task=args.task, seq_len=args.seq_len, batch_size=args.batch_size,
                      batch_tokens=args.batch_tokens, precision=args.precision, optimizer=args.optimizer,
                      peak_tflops=args.peak_tflops, mfu=args.mfu, overrides=args.overrides,
                      grad_checkpoint=args.grad_checkpoint)
    if args.json:
        print(json.dumps(result))
        return 0
    counts, training = result["parameters"], result["training"]
    print(f"{result['profile']}")
    print(f"  parameters     {counts['total'] / 1e6:.2f}M  (embedding {counts['embedding'] / 1e6:.2f}M, "
          f"non-embedding {counts['non_embedding'] / 1e6:.2f}M)")
    print(f"  weights        {result['weights_mb']['fp32']:.2f} MB fp32, {result['weights_mb']['fp16']:.2f} MB fp16")
    print(f"  training       {training['precision']}, {training['optimizer']}, batch {training['batch_size']} x "
          f"{training['seq_len']} tokens" + (", activation checkpointing" if training["grad_checkpoint"] else ""))
    for key, value in training["memory_mb"].items():
        print(f"    {key:<24}{value:>12,.2f} MB")
    print(f"  FLOPs/token    {result['flops_per_token'] / 1e9:.3f} GFLOP (training)")
    if "seconds_per_million_tokens" in result:
        print(f"  1M tokens      {result['seconds_per_million_tokens']:.1f} s at {result['peak_tflops']} TFLOP/s "
              f"peak and {result['mfu']:.0%} MFU")
    return 0
