"""Competition metrics on class probabilities, one definition shared by train, ensemble and infer.

Every stage scores through `score` so a CV number means the same thing everywhere. Labels are
class indices (0..K-1, the order of the classes list); probabilities are (N, K).
Usage: ``cv = score("macro_f1", labels, probs); better = higher_is_better("macro_f1")``.
"""

from __future__ import annotations

import difflib

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, log_loss, precision_recall_fscore_support

from kpipe.errors import KpipeError

METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "log_loss")
# Kaggle's usual clipping for log loss: one confident mistake costs ~34.5, not infinity.
LOG_LOSS_EPS = 1e-15


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, METRICS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KpipeError(f"unknown metric '{metric}'{hint}; choose one of {', '.join(METRICS)}.")


def higher_is_better(metric: str) -> bool:
    """True for accuracy and macro-F1, False for log loss."""
    _check_metric(metric)
    return metric != "log_loss"


def score(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """The competition metric of probabilities `probs` (N, K) against integer `labels` (N,)."""
    _check_metric(metric)
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N, K) with N={len(labels)}; got shape {probs.shape}")
    if len(labels) == 0:
        raise ValueError("cannot score zero rows")
    n_classes = probs.shape[1]
    if metric == "log_loss":
        # Clip, then renormalise so each row still sums to 1 (sklearn warns otherwise).
        p = np.clip(probs, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
        p /= p.sum(axis=1, keepdims=True)
        return float(log_loss(labels, p, labels=np.arange(n_classes)))
    return score_preds(metric, labels, probs.argmax(axis=1))


def score_preds(metric: str, labels: np.ndarray, preds: np.ndarray) -> float:
    """Accuracy or macro-F1 of hard predictions (class indices); log loss needs probabilities."""
    _check_metric(metric)
    if metric == "log_loss":
        raise ValueError("log_loss needs probabilities: use score()")
    labels, preds = np.asarray(labels), np.asarray(preds)
    if metric == "accuracy":
        return float((preds == labels).mean())
    # Macro over the classes present in labels or predictions (sklearn's and Kaggle's usual
    # definition), so a fold that lacks a rare class is not charged a zero for it.
    return float(f1_score(labels, preds, average="macro", zero_division=0))


def per_class_report(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class (rows in `classes` order), for reports."""
    precision, recall, f1, support = precision_recall_fscore_support(
        np.asarray(labels), np.asarray(preds), labels=np.arange(len(classes)), zero_division=0
    )
    return pd.DataFrame(
        {"class": list(classes), "precision": precision, "recall": recall, "f1": f1, "support": support}
    )
