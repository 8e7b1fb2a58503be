"""Confident learning over out-of-fold probabilities: which training images look misfiled.

cleanlab's `find_label_issues` flags images whose given label the model, never having trained on them,
disagrees with. kpipe's default filter is cleanlab's `low_self_confidence`: cleanlab estimates how many
labels are wrong (`num_label_issues`, from the confident joint) and flags that many images, lowest
p(given label) first. On the demo's OOF it beat cleanlab's own default (`prune_by_noise_rate`, which
picks per class pair by margin): precision/recall 0.987/0.938 vs 0.900/0.900 on the same 80 planted
errors (README, "Cleaning"). Every filter_by cleanlab has can be chosen (FILTERS).
Each suspect gets score = 1 - p(given label) and suggested = the most probable other class.
Usage: ``suspects = find_suspects(ids, labels, probs, classes, filter_by="low_self_confidence")``
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import pandas as pd

from kpipe.console import console
from kpipe.data.relabels import sort_relabels
from kpipe.errors import KpipeError, preview

# cleanlab's find_label_issues(filter_by=...) choices; the first is kpipe's default (see above).
FILTERS = (
    "low_self_confidence",
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "low_normalized_margin",
    "predicted_neq_given",
)


def find_suspects(
    ids: list[str],
    labels: list[str],
    probs: np.ndarray,
    classes: list[str],
    filter_by: str = FILTERS[0],
) -> pd.DataFrame:
    """Confident-learning suspects: DataFrame[id, given, suggested, score], score descending."""
    if filter_by not in FILTERS:
        raise KpipeError(f"unknown cleaning filter {filter_by!r}; choose one of {', '.join(FILTERS)}.")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise KpipeError(f"oof.csv: labels {preview(unknown)} have no p_<class> column.")
    if len(set(ids)) != len(ids):
        raise KpipeError("oof.csv: ids repeat; expected one out-of-fold row per training image.")
    from cleanlab.filter import find_label_issues  # imported here: a slow import only this stage needs
    from cleanlab.rank import get_label_quality_scores

    y = np.array([index[label] for label in labels], dtype=int)
    probs = np.clip(probs, 0.0, None)
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # n_jobs=1: its process pool costs more than it saves here
        issues = find_label_issues(y, probs, filter_by=filter_by, n_jobs=1)
    few = sorted(
        {int(m.group(1)) for w in caught if (m := re.search(r"class: (\d+), it has too few", str(w.message)))}
    )
    if few:
        console.print(
            f"[yellow]cleanlab: classes {preview([classes[i] for i in few])} have too few images "
            "for it to flag every issue in them."
        )
    score = np.round(1.0 - get_label_quality_scores(y, probs, method="self_confidence"), 4)
    others = probs.copy()
    others[np.arange(len(y)), y] = -1.0  # the best class that is not the given one
    suggested = others.argmax(axis=1)
    rows = np.flatnonzero(issues)
    out = pd.DataFrame(
        {
            "id": np.asarray(ids, dtype=object)[rows],
            "given": np.asarray(labels, dtype=object)[rows],
            "suggested": [classes[k] for k in suggested[rows]],
            "score": score[rows],
        }
    )
    return sort_relabels(out)


def relabel_precision_recall(relabels_df: pd.DataFrame, truth_df: pd.DataFrame) -> dict[str, Any]:
    """How well the acted-on rows match the truly misfiled images (the demo's truth file).

    Acted on = decision accept or drop (both take the wrong label out of training).
    precision = acted rows whose given label really was wrong / acted rows;
    recall = misfiled train ids acted on / misfiled train ids;
    fix_accuracy = accepted misfiled rows whose suggested class is the true one / accepted misfiled rows.
    A ratio with a zero denominator is NaN.
    """
    t = truth_df[truth_df["split"].astype(str) == "train"]
    true = dict(zip(t["id"].astype(str), t["true_label"].astype(str), strict=True))
    misfiled = {
        i for i, g in zip(t["id"].astype(str), t["given_label"].astype(str), strict=True) if g != true[i]
    }
    d = relabels_df.astype({"id": str, "decision": str, "suggested": str})
    acted = d[d["decision"].isin(["accept", "drop"])].drop_duplicates("id")
    hits = acted["id"].isin(misfiled)
    acc_hits = acted[hits & (acted["decision"] == "accept")]
    fixed = int((acc_hits["suggested"] == acc_hits["id"].map(true)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {
        "precision": ratio(int(hits.sum()), len(acted)),
        "recall": ratio(int(hits.sum()), len(misfiled)),
        "fix_accuracy": ratio(fixed, len(acc_hits)),
        "n_accepted": int((acted["decision"] == "accept").sum()),
        "n_dropped": int((acted["decision"] == "drop").sum()),
        "n_hits": int(hits.sum()),
        "n_misfiled": len(misfiled),
    }
