"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kpipe.errors import KpipeError
from kpipe.eval import metrics

LABELS = np.array([0, 1, 2, 2])
PROBS = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.0, 0.0, 1.0]])


def test_accuracy_and_macro_f1() -> None:
    assert metrics.score("accuracy", LABELS, PROBS) == 0.75
    # preds 0,0,2,2: F1 class0 = 2/3, class1 = 0, class2 = 1
    assert metrics.score("macro_f1", LABELS, PROBS) == pytest.approx((2 / 3 + 0 + 1) / 3)


def test_log_loss_clips_and_uses_all_classes() -> None:
    expected = -(math.log(0.7) + math.log(0.3) + math.log(0.8) + math.log(1 - 2e-15)) / 4
    assert metrics.score("log_loss", LABELS, PROBS) == pytest.approx(expected, rel=1e-6)
    # a class never seen in labels still counts as a column
    assert metrics.score("log_loss", np.array([0]), np.array([[0.5, 0.25, 0.25]])) == pytest.approx(
        math.log(2)
    )
    # a confident miss is large but finite
    assert 30 < metrics.score("log_loss", np.array([1]), np.array([[1.0, 0.0]])) < 40


def test_higher_is_better_and_unknown_metric() -> None:
    assert metrics.higher_is_better("accuracy") and metrics.higher_is_better("macro_f1")
    assert not metrics.higher_is_better("log_loss")
    with pytest.raises(KpipeError, match="did you mean 'log_loss'"):
        metrics.score("logloss", LABELS, PROBS)


def test_per_class_report() -> None:
    df = metrics.per_class_report(LABELS, PROBS.argmax(1), ["a", "b", "c"])
    assert df["class"].tolist() == ["a", "b", "c"]
    assert df["support"].tolist() == [1, 1, 2]
    np.testing.assert_allclose(df["precision"], [0.5, 0.0, 1.0])
    np.testing.assert_allclose(df["recall"], [1.0, 0.0, 1.0])


def test_balanced_accuracy_weighs_every_class_equally() -> None:
    labels = np.array([0, 0, 0, 0, 1])  # class 1 is rare; always predicting class 0 is 80 % accurate
    probs = np.tile([0.9, 0.1], (5, 1))
    assert metrics.score("accuracy", labels, probs) == pytest.approx(0.8)
    assert metrics.score("balanced_accuracy", labels, probs) == pytest.approx(0.5)  # (1 + 0) / 2
    assert metrics.higher_is_better("balanced_accuracy")
