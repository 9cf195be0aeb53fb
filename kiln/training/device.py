"""Device and precision selection. GPU-only paths are guarded here, in one place."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from kiln.errors import KilnError


def resolve_device(spec: str) -> Any:
    """``auto`` picks CUDA when available (this rank's GPU under torchrun), else CPU."""
    import os

    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise KilnError(f"--device {spec}: CUDA is not available on this machine")
    if spec == "cuda":  # under torchrun, each rank takes its own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return torch.device(spec)
    except RuntimeError:
        raise KilnError(f"--device: cannot parse '{spec}' (use auto, cpu, cuda or cuda:N)") from None


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AMX or AVX512-BF16).

    Without it, bf16 matmul on CPU is emulated and far slower than fp32 (measured >100x on AVX2).
    """
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(amx or avx512_bf16)


PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_precision(spec: str, device: Any) -> str:
    """``auto``: bf16 on CUDA with bf16 support and on CPUs with native bf16 (AMX, AVX512-BF16),
    fp16 on older GPUs, else fp32. The ``KILN_PRECISION`` environment variable, when set, is what
    ``auto`` means on this machine (``make test PRECISION=bf16`` runs the suite so)."""
    import torch

    if spec == "auto":
        spec = _environment_precision() or spec
    if spec == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if spec == "fp16" and device.type != "cuda":
        raise KilnError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if spec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise KilnError("--precision bf16: this GPU does not support bf16; use fp16")
    return spec


def inference_precision(spec: str | None, device: Any) -> str:
    """Precision for ``predict``/``evaluate``: as given, else ``KILN_PRECISION``, else fp32.

    fp32 by default so that kiln's predictions match plain transformers (fp32) on every machine;
    bf16 is a choice (``--precision bf16`` or ``auto``) that trades agreement for speed.
    """
    return resolve_precision(spec or _environment_precision() or "fp32", device)


def _environment_precision() -> str | None:
    """``KILN_PRECISION``, checked; None when unset or empty."""
    import os

    spec = os.environ.get("KILN_PRECISION") or None
    if spec is not None and spec not in PRECISIONS:
        raise KilnError(f"KILN_PRECISION={spec}: use one of {', '.join(PRECISIONS)}")
    return spec


def autocast(device: Any, precision: str) -> Any:
    """Autocast context for the forward pass (weights and optimizer stay fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def mark(name: str) -> Any:
    """A named range for ``torch.profiler`` (``benchmarks/profile_step.py`` sorts time by these);
    a few microseconds when no profiler runs."""
    import torch

    return torch.profiler.record_function(name)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed memory instead of handing it back to the kernel.

    By default every tensor over 32 MiB is its own ``mmap`` and is unmapped when freed, and the top
    of the heap is trimmed; a training step frees and re-allocates the same buffers (activations,
    autocast's weight copies, gradients), so each step page-faults them in again, which the kernel
    zero-fills. On a 2-core AMX CPU that was ~20 % of a BERT step (``fill_``/``copy_`` in
    ``benchmarks/profile_step.py``). Keeping the memory costs nothing at the peak: it is what the
    step needs anyway. Returns False where there is no glibc (macOS, musl), which changes nothing.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
