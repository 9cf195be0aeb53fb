"""Where one training step's time goes: kiln's own loop under ``torch.profiler``, by category.

Reproduce (from the repository root)::

    .venv/bin/python benchmarks/profile_step.py --profile bert-base --task mlm --out profile.json

It trains ``--warmup`` steps, then profiles ``--steps`` steps of the real :class:`kiln.Trainer`
(the same collate, forward, backward, clipping and optimizer as ``kiln train``) and sorts each
operator's *self* time (time in the operator itself, not in the operators it calls) into:

- ``matmul``: mm/addmm/bmm/linear kernels (oneDNN/AMX on CPU, cuBLAS on CUDA);
- ``attention``: the fused scaled-dot-product attention kernels and their backward;
- ``optimizer``: everything inside the update (gradient clipping, the AdamW step, zeroing);
- ``dtype casts``: ``copy_``/``_to_copy`` outside the optimizer (autocast re-casting weights and
  casting gradients back);
- ``norms/element-wise``: LayerNorm, GELU, residual adds, dropout, embeddings, indexing, ...;
- ``loss/head``: log-softmax, NLL/cross-entropy and their backward;
- ``compiled kernels``: ``torch.compile``'s fused kernels (``--compile on``);
- ``collate/data``: building the step's batches from the features (masking included);
- ``python/framework``: the rest of the step's wall time: Python, dispatch, autograd bookkeeping.

The step's wall time is measured around each profiled step, so the categories add up to it.
Profiling itself adds overhead to very short operators; read the shares, not the absolute times.

``--data`` defaults to WikiText-2 in ``../shared/data`` for the pretraining tasks and to kiln's
shipped sample (``examples/sentiment``) for ``sequence``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kiln import Callback  # noqa: E402  (from the checkout, after the path above)

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"
DEFAULT_DATA = {"mlm": WIKITEXT, "clm": WIKITEXT, "span": WIKITEXT, "sequence": ROOT / "examples" / "sentiment"}

CATEGORIES = ("matmul", "attention", "optimizer", "dtype casts", "norms/element-wise", "loss/head",
              "compiled kernels", "collate/data", "python/framework")
MATMUL = ("mm", "addmm", "matmul", "_mkldnn", "mkldnn_", "onednn", "linear", "cublas",
          "gemm", "_addmm_activation")
# Batched matmuls and softmax occur only in attention in these models (linear layers are mm/addmm, the
# head's is a log-softmax), so eager attention is counted as attention too.
ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "_cudnn_attention", "aten::bmm",
             "aten::baddbmm", "aten::_softmax", "aten::softmax", "aten::_softmax_backward_data")
CASTS = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::_copy_from")
LOSS = ("log_softmax", "nll_loss", "cross_entropy", "softmax_backward_data")
# Events that only call others: their self time is dispatch, which is the framework's.
WRAPPERS = ("autograd::engine", "kiln.", "Optimizer.", "aten::linear", "aten::matmul", "torch::autograd",
            "ProfilerStep", "## ")


def categorise(name: str, ancestors: list[str]) -> str:
    """The category of an operator ``name`` called inside the ranges ``ancestors`` (outermost first)."""
    ranges = [*ancestors, name]
    if "kiln.collate" in ranges:
        return "collate/data"
    if any(a == "kiln.optimizer" or a.startswith("Optimizer.") for a in ranges) or name.startswith(
            ("aten::_foreach", "aten::_fused_adam")):
        return "optimizer"
    if "Compiled" in name or "inductor" in name.lower() or name.startswith(("cpp_fused", "triton_", "graph_")):
        return "compiled kernels"
    if any(a.startswith(("CompiledFunction", "Torch-Compiled")) for a in ancestors) and not name.startswith("aten::"):
        return "compiled kernels"
    if name.startswith(WRAPPERS) or name in ("aten::t", "aten::view", "aten::reshape", "aten::transpose",
                                               "aten::expand", "aten::permute", "aten::as_strided",
                                               "aten::empty", "aten::empty_strided", "aten::detach"):
        return "python/framework"
    lowered = name.lower()
    if any(key in lowered for key in ATTENTION):
        return "attention"
    if any(key in lowered for key in LOSS):
        return "loss/head"
    if name in CASTS:
        return "dtype casts"
    op = name.split("::")[-1]
    if any(op == key or op.startswith(key) for key in MATMUL) or "gemm" in lowered:
        return "matmul"
    return "norms/element-wise"


def split_profile(events: Any, wall_us: float, device: bool = False) -> tuple[dict[str, float], dict[str, dict]]:
    """Microseconds per category (each event's self time in its category, and the wall time no operator
    accounts for as ``python/framework``), and per category the microseconds of each operator."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    by_op: dict[str, dict[str, float]] = {name: {} for name in CATEGORIES}
    for event in events:
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        ancestors.reverse()
        self_time = event.self_device_time_total if device else event.self_cpu_time_total
        category = categorise(event.name, ancestors)
        totals[category] += self_time
        by_op[category][event.name] = by_op[category].get(event.name, 0.0) + self_time
    accounted = sum(totals.values())
    totals["python/framework"] += max(0.0, wall_us - accounted)
    return totals, by_op


class StepProfiler(Callback):
    """Profiles steps ``warmup+1 .. warmup+steps`` and times each of them."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.profiler: Any = None
        self.walls: list[float] = []
        self._last = 0.0

    def on_step_end(self, trainer: Any, logs: dict | None) -> None:
        import torch

        step = trainer.state.step
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.warmup < step <= self.warmup + self.steps:
            self.walls.append(now - self._last)
        if step == self.warmup:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if trainer.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        elif step == self.warmup + self.steps and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
        self._last = time.perf_counter()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="bert-base", help="kiln profile (architecture and recipe)")
    parser.add_argument("--task", default="mlm", help="kiln task")
    parser.add_argument("--data", type=Path, default=None, help="data directory (see the module doc)")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument("--compile", default=None, help="kiln's --compile: on, off or auto (default: kiln's)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step (0: the profile's)")
    parser.add_argument("--seq-len", type=int, default=128, help="pretraining block length")
    parser.add_argument("--warmup", type=int, default=3, help="steps before profiling")
    parser.add_argument("--steps", type=int, default=3, help="steps profiled")
    parser.add_argument("-c", dest="overrides", action="append", default=[], help="kiln -c key=value")
    parser.add_argument("--top", type=int, default=3, help="operators shown per category (ms/step)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)

    import logging

    import torch

    import kiln

    logging.getLogger("kiln").setLevel(logging.WARNING)
    data = args.data or DEFAULT_DATA.get(args.task)
    if data is None or not Path(data).exists():
        sys.exit(f"profile_step.py: no data for {args.task}; give --data DIR")
    overrides = [*args.overrides, "train.grad_accum=1", "train.log_every=1000", "train.dropout=0.0"]
    if args.layers:
        layer_key = "num_layers" if args.profile.startswith(("t5", "mt-")) else "num_hidden_layers"
        overrides.append(f"model.config.{layer_key}={args.layers}")
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.task in ("mlm", "clm", "span"):
        overrides.append(f"pretrain.seq_len={args.seq_len}")
    probe = StepProfiler(args.warmup, args.steps)
    with tempfile.TemporaryDirectory(prefix="kiln-profile-") as tmp:
        train_data = Path(data)
        if args.task in ("mlm", "clm", "span"):  # a sliver of valid.txt: the final evaluation is not profiled
            train_data = Path(tmp) / "data"
            train_data.mkdir()
            (train_data / "train.txt").symlink_to((Path(data) / "train.txt").resolve())
            valid = (Path(data) / "valid.txt").read_text(encoding="utf-8").splitlines()[:50]
            (train_data / "valid.txt").write_text("\n".join(valid) + "\n", encoding="utf-8")
        run = kiln.train(args.task, train_data, name="profile", profile=args.profile, output_dir=tmp,
                         max_steps=args.warmup + args.steps, precision=args.precision, overrides=overrides,
                         callbacks=[probe], keep_checkpoints=False,
                         **({"train.compile": args.compile} if args.compile else {}))
        precision = json.loads((run.path / "run.json").read_text())["config"]["train"]["precision"]
    device = probe.profiler.use_device is not None and torch.cuda.is_available()
    wall_us = sum(probe.walls) * 1e6
    totals, by_op = split_profile(probe.profiler.events(), wall_us, device=bool(device))
    per_step = {k: v / 1e3 / args.steps for k, v in totals.items()}
    step_ms = wall_us / 1e3 / args.steps
    result = {"profile": args.profile, "task": args.task, "precision": args.precision, "resolved": precision,
              "compile": args.compile, "layers": args.layers, "batch_size": args.batch_size,
              "steps": args.steps, "step_ms": step_ms, "ms_per_step": per_step,
              "share": {k: v / max(step_ms, 1e-9) for k, v in per_step.items()},
              "top_ops": {k: {op: round(us / 1e3 / args.steps, 2) for op, us in sorted(
                  ops.items(), key=lambda item: -item[1])[:5]} for k, ops in by_op.items()},
              "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_name()}
    print(f"{args.profile} {args.task}, precision {args.precision}, compile {args.compile or 'default'}: "
          f"{step_ms:.0f} ms per step ({args.steps} steps after {args.warmup}), {cpu_name()}")
    print(f"{'category':<20}{'ms/step':>10}{'share':>8}")
    for name in CATEGORIES:
        top = ", ".join(f"{op.removeprefix('aten::')} {ms:.0f}" for op, ms in list(result["top_ops"][name].items())
                        [:args.top] if ms >= 1)
        print(f"{name:<20}{per_step[name]:>10.1f}{per_step[name] / max(step_ms, 1e-9):>8.1%}  {top}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def cpu_name() -> str:
    """The CPU model and its matmul ISA (amx, avx512_bf16 or avx2), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    isa = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "avx2"
    return f"{model} ({isa})"


if __name__ == "__main__":
    main()
