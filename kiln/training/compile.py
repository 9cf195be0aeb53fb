"""``torch.compile`` (inductor) for training and inference: whether to use it, where its cache lives,
what it cost, and eager mode whenever it cannot work.

Compiling fuses the element-wise work around the matmuls (casts, bias+GELU, residual adds, dropout,
LayerNorm) into a few generated kernels, which is where fast-matmul hardware spends its time.
kiln batches into length buckets, so a run meets a bounded number of input shapes; each new one
costs a compilation, which :class:`CompileWatch` counts and times for the run summary.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

log = logging.getLogger(__name__)

# `auto` compiles a CUDA run long enough to pay a compilation back: at least this many optimizer steps,
# or a budget of at least this many seconds. Not on a CPU: on a 2-core AMX CPU (torch 2.13) a
# compiled BERT-base MLM step took as long as an eager one (1,422 vs 1,446 ms): inductor's fused CPU
# kernels cost what eager's casts and element-wise ops cost, and the matmuls are oneDNN's either way.
AUTO_MIN_STEPS = 300
AUTO_MIN_SECONDS = 600.0


def cache_dir() -> Any:
    """Inductor's cache inside kiln's (``$KILN_CACHE/inductor``), so a second run starts warm."""
    from kiln.tokenizers import kiln_cache

    return kiln_cache() / "inductor"


def unavailable(device: Any) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here (None: it can)."""
    try:
        import torch._dynamo  # noqa: F401
    except Exception as error:  # a torch build without dynamo
        return f"torch.compile is unavailable ({error})"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed"
    compiler = cxx()
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) for inductor's CPU kernels"
    return None


def cxx() -> str:
    """The C++ compiler inductor is to use: ``$CXX``, else g++, else c++ (g++ when neither is found)."""
    return os.environ.get("CXX") or ("g++" if shutil.which("g++") or not shutil.which("c++") else "c++")


def wanted(setting: str, device: Any, long_run: bool) -> bool:
    """Whether to compile: ``on``/``off`` as said; ``auto`` for a ``long_run`` on CUDA
    (:data:`AUTO_MIN_STEPS` steps or :data:`AUTO_MIN_SECONDS` of budget)."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" and long_run


def compile_module(module: Any, device: Any) -> Any | None:
    """``module`` compiled by inductor, or None (after one warning) where compiling cannot work.

    Shapes are left to dynamo's automatic dynamism: the first shape is compiled static (fastest), a
    second shape of the same graph makes the dimensions that changed symbolic, so length buckets and
    varying counts of masked positions do not each cost a compilation."""
    reason = unavailable(device)
    if reason:
        log.warning(f"  compile   off: {reason}; running eagerly")
        return None
    import torch
    import torch._dynamo
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch fills the variable in with its default (a temporary directory) on first use: replace that,
    # never a directory the user chose.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())

    import torch._inductor.config

    # Inductor reads CXX once, at its import; kiln checked the compiler the environment names now.
    torch._inductor.config.cpp.cxx = (None, cxx())
    # Many buckets of a long tail of lengths must not end in dynamo's 'recompile limit' eager fallback.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(module, dynamic=None)


def compile_failed(error: BaseException) -> bool:
    """True when ``error`` came from compiling (dynamo or inductor), not from the model itself."""
    names = {cls.__module__.split(".")[:2][-1] for cls in type(error).__mro__}
    return bool(names & {"_dynamo", "_inductor"})


def fall_back(error: BaseException) -> None:
    """Say once why a compiled module went back to eager mode."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    log.warning(f"  compile   failed ({type(error).__name__}: {first[:200]}); running eagerly")


class CompileWatch:
    """Counts the input shapes a compiled module met and the seconds their first steps took beyond an
    ordinary step, and whether every graph came from a cache (a warm start: inductor's on-disk cache
    in a new process, dynamo's own in the same one)."""

    def __init__(self) -> None:
        self.shapes: set[tuple] = set()
        self.first_seconds: list[float] = []
        self.other_seconds: list[float] = []
        self._new = False
        self._start = 0.0
        self._compiled_before = inductor_compilations()

    def begin(self, batches: list[dict]) -> None:
        """Before a step over ``batches``: note whether it brings a shape not seen before."""
        signature = [tuple((k, tuple(v.shape)) for k, v in sorted(b.items()) if hasattr(v, "shape")) for b in batches]
        new = [s for s in signature if s not in self.shapes]
        self.shapes.update(signature)
        self._new = bool(new)
        self._start = time.perf_counter()

    def end(self) -> None:
        """After the step: its time goes to the compiling steps or to the ordinary ones."""
        (self.first_seconds if self._new else self.other_seconds).append(time.perf_counter() - self._start)

    def seconds(self) -> float:
        """Time the compiling steps took beyond what ordinary steps take."""
        ordinary = sorted(self.other_seconds)[len(self.other_seconds) // 2] if self.other_seconds else 0.0
        return max(0.0, sum(s - ordinary for s in self.first_seconds))

    def warm(self) -> bool:
        """True when no graph had to be compiled afresh."""
        return bool(self.shapes) and inductor_compilations() == self._compiled_before

    def summary(self) -> str:
        """``compiled 3 shapes in 41s``, with ``(warm: from the cache)`` on a warm start."""
        count = len(self.shapes)
        warm = " (warm: from the cache)" if self.warm() else ""
        return f"compiled {count} shape{'s' * (count != 1)} in {self.seconds():.0f}s{warm}"


def inductor_compilations() -> int:
    """Graphs inductor compiled afresh in this process (cache misses)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return 0
    return int(counters["inductor"].get("fxgraph_cache_miss", 0))
