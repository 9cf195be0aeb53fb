"""Classification and regression metrics, computed by scikit-learn and scipy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_metrics(labels: Sequence[int], predictions: Sequence[int], num_labels: int) -> dict:
    """Accuracy, macro-F1 and MCC; ``f1`` is binary F1 (positive class id 1) for two classes,
    else macro-F1, matching the GLUE convention."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    y_true, y_pred = np.asarray(labels), np.asarray(predictions)
    ids = list(range(num_labels))
    macro = float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0))
    result = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": macro,
        "macro_f1": macro,
        "mcc": float(matthews_corrcoef(y_true, y_pred)) if len(y_true) > 1 else 0.0,
    }
    if num_labels == 2:
        result["f1"] = float(f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0))
    return result


def regression_metrics(labels: Sequence[float], predictions: Sequence[float]) -> dict:
    """Pearson and Spearman correlation and mean squared error."""
    from scipy.stats import pearsonr, spearmanr

    y_true = np.asarray(labels, dtype=np.float64)
    y_pred = np.asarray(predictions, dtype=np.float64)
    constant = len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0
    return {
        # Correlation is undefined for a constant series (an untrained model); report 0, not NaN.
        "pearson": 0.0 if constant else float(pearsonr(y_true, y_pred)[0]),
        "spearman": 0.0 if constant else float(spearmanr(y_true, y_pred)[0]),
        "mse": float(np.mean((y_true - y_pred) ** 2)),
    }


def multi_label_metrics(gold: np.ndarray, predicted: np.ndarray, labels: Sequence[str]) -> dict:
    """Micro- and macro-F1 over the labels, subset accuracy (every label of an example right), and each
    label's F1 as ``f1/LABEL``; ``gold`` and ``predicted`` are ``(examples, labels)`` booleans."""
    from sklearn.metrics import f1_score

    y_true, y_pred = np.asarray(gold, dtype=bool), np.asarray(predicted, dtype=bool)
    per_label = f1_score(y_true, y_pred, average=None, zero_division=0)
    result = {
        "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "macro_f1": float(np.mean(per_label)) if len(per_label) else 0.0,
        "subset_accuracy": float(np.mean(np.all(y_true == y_pred, axis=1))) if len(y_true) else 0.0,
    }
    result.update({f"f1/{label}": float(f) for label, f in zip(labels, per_label, strict=True)})
    return result
