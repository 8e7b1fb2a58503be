"""Pseudo-labels: test images labelled by a trained model or ensemble, added to training rows only.

`kpipe pseudo` keeps the test rows whose top probability reaches a threshold and writes
<work_dir>/pseudo/<name>.csv (id, label, confidence, p_<class>...: soft, or one-hot with --hard).
`kpipe train data.pseudo=<file>` appends them to the fold table with fold PSEUDO_FOLD, which is never a
validation fold, so every fold trains on them and none is scored on them; OOF and CV stay on the
labelled rows. Their training target is pseudo_weight x p (labelled rows: their one-hot): with
probability targets the cross-entropy is linear in the target, so that is a per-row loss weight.
Usage: ``table = select(ids, probs, classes, 0.9, hard=False); rows, targets = with_pseudo(df, table, classes, 1.0)``
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kpipe.config import Config
from kpipe.data import ingest
from kpipe.errors import KpipeError, preview
from kpipe.io import read_csv_ids

PSEUDO_FOLD = -2  # never a validation fold: folds are 0..n-1, and -1 is the full-data fit's


def select(
    ids: list[str], probs: np.ndarray, classes: list[str], threshold: float, hard: bool
) -> pd.DataFrame:
    """The rows whose top probability is at least `threshold`: id, label, confidence, p_<class>."""
    p = np.asarray(probs, dtype=np.float64)
    conf, top = p.max(axis=1), p.argmax(axis=1)
    keep = conf >= threshold
    targets = np.eye(len(classes))[top[keep]] if hard else p[keep]
    head = pd.DataFrame(
        {
            "id": np.asarray(ids, dtype=object)[keep],
            "label": np.asarray(classes)[top[keep]],
            "confidence": conf[keep],
        }
    )
    return pd.concat([head, pd.DataFrame(targets, columns=[f"p_{c}" for c in classes])], axis=1)


def read_pseudo(path: Path, classes: list[str]) -> pd.DataFrame:
    """A pseudo-label CSV, checked: its class columns are this competition's, its targets finite, >= 0."""
    if not path.is_file():
        raise KpipeError(f"data.pseudo: {path} not found. Write it with `kpipe pseudo --from <predictions>`.")
    df = read_csv_ids(path)
    cols = [f"p_{c}" for c in classes]
    missing = [c for c in ["id", "label", *cols] if c not in df.columns]
    if missing:
        raise KpipeError(
            f"{path}: missing columns {preview(missing)}; it must be `kpipe pseudo`'s output for "
            "this competition's classes."
        )
    t = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(t).all(axis=1) | (t < 0).any(axis=1)
    if bad.any():
        raise KpipeError(
            f"{path}: rows {preview(df['id'][bad].tolist())} have targets that are not finite and >= 0."
        )
    if df["id"].duplicated().any():
        raise KpipeError(
            f"{path}: ids appear more than once: {preview(df['id'][df['id'].duplicated()].tolist())}."
        )
    return df


def with_pseudo(
    df: pd.DataFrame, pseudo: pd.DataFrame, test_paths: pd.Series, classes: list[str], weight: float
) -> tuple[pd.DataFrame, np.ndarray]:
    """The fold table with the pseudo rows appended (fold PSEUDO_FOLD, a `pseudo` flag), and every row's
    training target (N, K): one-hot for labelled rows, weight x p for pseudo rows."""
    unknown = sorted(set(pseudo["id"]) - set(test_paths.index))
    if unknown:
        raise KpipeError(f"data.pseudo: ids {preview(unknown)} are not test images of this competition.")
    k = len(classes)
    extra = pd.DataFrame(
        {
            "id": pseudo["id"].tolist(),
            "label": pseudo["label"].tolist(),
            "fold": PSEUDO_FOLD,
            "path": test_paths[pseudo["id"]].tolist(),
            "y": pseudo[[f"p_{c}" for c in classes]].to_numpy(np.float64).argmax(axis=1),
        }
    )
    rows = pd.concat([df.assign(pseudo=False), extra.assign(pseudo=True)], ignore_index=True)
    targets = np.concatenate(
        [np.eye(k)[df["y"].to_numpy()], weight * pseudo[[f"p_{c}" for c in classes]].to_numpy(np.float64)]
    )
    return rows, targets.astype(np.float32)


def training_rows(
    cfg: Config, df: pd.DataFrame, classes: list[str]
) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """data.pseudo read and appended to the fold table: (rows, targets, what the run records about the file)."""
    d, t = cfg.data, cfg.train
    if d.cache or d.batch_aug:
        raise KpipeError(
            "data.pseudo with data.cache / data.batch_aug: the cache holds the train images only. "
            "Add data.cache=false data.batch_aug=false."
        )
    if t.mixup_alpha > 0 or t.cutmix_alpha > 0:
        raise KpipeError(
            "data.pseudo with mixup/cutmix: pseudo rows train on probability targets, which "
            "timm's Mixup does not take. Set train.mixup_alpha=0 train.cutmix_alpha=0."
        )
    path = Path(str(d.pseudo))
    table = read_pseudo(path, classes)
    test = ingest.load_test(cfg)
    rows, targets = with_pseudo(df, table, test.set_index("id")["path"], classes, d.pseudo_weight)
    record = {
        "file": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "n_rows": len(table),
        "weight": d.pseudo_weight,
        "note": "pseudo rows train in every fold and are never validated; CV is on labelled rows only",
    }
    return rows, targets, record
