"""Classification metrics from a confusion matrix: accuracy, macro-F1, per-class recall, collapse.

Torch-free (numpy only). :func:`~edge_sdk.training._train.evaluate` counts a confusion matrix over
the model's ``num_labels`` classes and adds :func:`class_metrics` to its accuracy and loss, so the
coordinator's validation, the simulator's evaluators and a device's evaluation task all report the
same names. The names are bounded (a metrics mapping on the wire holds at most 64 entries):

- ``macro_f1``: the unweighted mean of the per-class F1 over the classes that occur in the labels or
  in the predictions (as scikit-learn's default); a class with no true positive has F1 0;
- ``majority_share``: the share of the evaluation rows in their most common class (what a model that
  always answers that class scores);
- ``recall_<i>`` for each class ``i < MAX_RECALL_KEYS`` (32) present in the labels; ``min_recall``
  over every present class (also beyond that bound);
- ``top_prediction_class`` / ``top_prediction_share``: the class predicted most, and its share of
  the predictions;
- ``collapsed``: 1.0 when the model predicts one class for almost every row (the rule below), else 0.0.

Collapse rule: with at least two classes, the most predicted class takes at least
:data:`COLLAPSE_SHARE` (95 %) of the predictions while its share of the true labels is lower by at
least :data:`COLLAPSE_MARGIN` (5 points). A model that answers one class on data that really is
almost all that class is not flagged; a model that answers "majority" for everything on data whose
majority is 68 % is (its accuracy then equals ``majority_share`` and says nothing).
"""

from __future__ import annotations

from typing import Final

import numpy as np

__all__ = [
    "COLLAPSE_MARGIN",
    "COLLAPSE_SHARE",
    "MAX_RECALL_KEYS",
    "class_metrics",
    "confusion_matrix",
    "is_collapsed",
]

MAX_RECALL_KEYS: Final = 32  # recall_<i> keys reported (min_recall covers every class)
COLLAPSE_SHARE: Final = 0.95  # share of the predictions one class must take to be a collapse
COLLAPSE_MARGIN: Final = 0.05  # ... while its true share is at least this much lower


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> np.ndarray:
    """``num_labels`` x ``num_labels`` counts, rows the true class, columns the predicted one.

    Labels outside ``0..num_labels-1`` (e.g. -100, "ignore") are left out.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(predictions, dtype=np.int64).reshape(-1)
    keep = (y >= 0) & (y < num_labels) & (p >= 0) & (p < num_labels)
    flat = y[keep] * num_labels + p[keep]
    return np.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def is_collapsed(confusion: np.ndarray) -> bool:
    """The collapse rule of the module docstring, on a confusion matrix."""
    total = int(confusion.sum())
    if confusion.shape[0] < 2 or total == 0:
        return False
    predicted = confusion.sum(axis=0)
    top = int(np.argmax(predicted))
    top_share = predicted[top] / total
    true_share = confusion[top].sum() / total
    return bool(top_share >= COLLAPSE_SHARE and true_share <= top_share - COLLAPSE_MARGIN)


def class_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Macro-F1, majority share, per-class recall and the collapse flag (names: the module docstring).

    An empty matrix gives an empty mapping.
    """
    c = np.asarray(confusion, dtype=np.float64)
    total = float(c.sum())
    if total == 0 or c.ndim != 2 or c.shape[0] != c.shape[1]:
        return {}
    true = c.sum(axis=1)
    predicted = c.sum(axis=0)
    tp = np.diag(c)
    present = true > 0
    seen = present | (predicted > 0)
    denominator = true + predicted  # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (true + predicted)
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    recall = np.divide(tp, true, out=np.zeros_like(tp), where=present)
    top = int(np.argmax(predicted))
    out: dict[str, float] = {
        "macro_f1": float(f1[seen].mean()),
        "majority_share": float(true.max() / total),
        "min_recall": float(recall[present].min()),
        "top_prediction_class": float(top),
        "top_prediction_share": float(predicted[top] / total),
        "collapsed": 1.0 if is_collapsed(confusion) else 0.0,
    }
    for i in np.flatnonzero(present[:MAX_RECALL_KEYS]):
        out[f"recall_{int(i)}"] = float(recall[i])
    return out
