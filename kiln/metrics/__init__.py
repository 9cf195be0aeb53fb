"""Metrics: thin wrappers over reference implementations (scikit-learn, scipy)."""

from collections.abc import Mapping


def metrics_line(metrics: Mapping[str, float]) -> str:
    """``accuracy 0.8888, f1 0.8928, loss 0.2868``: how kiln shows a set of metrics on one line (the
    example count ``n`` is said separately, where it is)."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")
