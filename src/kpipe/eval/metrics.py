"""Competition metrics on class probabilities, one definition shared by train, ensemble and infer.

Every stage scores through `score` so a CV number means the same thing everywhere. Labels are
class indices (0..K-1, the order of the classes list); probabilities are (N, K).
Usage: ``cv = score("macro_f1", labels, probs); better = higher_is_better("macro_f1")``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, precision_recall_fscore_support

from kpipe.registry import METRICS

# Kaggle's usual clipping for log loss: one confident mistake costs ~34.5, not infinity.
LOG_LOSS_EPS = 1e-15


# Each metric scores (labels (N,), probs (N, K)). Adding one is one entry here (and its test): the config
# schema, train's validation columns, ensemble fitting and every report pick it up from the registry.


@METRICS.register("accuracy", higher_is_better=True)
def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())


@METRICS.register("macro_f1", higher_is_better=True)
def macro_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    # Macro over the classes present in labels or predictions (sklearn's and Kaggle's usual
    # definition), so a fold that lacks a rare class is not charged a zero for it.
    return float(f1_score(labels, probs.argmax(axis=1), average="macro", zero_division=0))


@METRICS.register("balanced_accuracy", higher_is_better=True)
def balanced_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    # The mean of per-class recall over the classes present in labels: a rare class counts as much as a big one.
    return float(balanced_accuracy_score(labels, probs.argmax(axis=1)))


@METRICS.register("log_loss", higher_is_better=False)
def log_loss_metric(labels: np.ndarray, probs: np.ndarray) -> float:
    # Clip, then renormalise so each row still sums to 1 (sklearn warns otherwise).
    p = np.clip(probs, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    p /= p.sum(axis=1, keepdims=True)
    return float(log_loss(labels, p, labels=np.arange(probs.shape[1])))


def names() -> list[str]:
    return METRICS.names()


def higher_is_better(metric: str) -> bool:
    """True for accuracy and macro-F1, False for log loss."""
    return bool(METRICS.meta(metric)["higher_is_better"])


def score(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """The competition metric of probabilities `probs` (N, K) against integer `labels` (N,)."""
    fn = METRICS.get(metric)
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N, K) with N={len(labels)}; got shape {probs.shape}")
    if len(labels) == 0:
        raise ValueError("cannot score zero rows")
    return fn(labels, probs)


def per_class_report(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class (rows in `classes` order), for reports."""
    precision, recall, f1, support = precision_recall_fscore_support(
        np.asarray(labels), np.asarray(preds), labels=np.arange(len(classes)), zero_division=0
    )
    return pd.DataFrame(
        {"class": list(classes), "precision": precision, "recall": recall, "f1": f1, "support": support}
    )
