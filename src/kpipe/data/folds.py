"""The folds file, folds/<comp>.csv (id, label, fold[, group]): how it is made, and the one reader of it.

Pure functions: stratified (optionally grouped) K-fold assignment, merging group columns, applying
cleaned labels; `load_fold_table` is what every stage that trains or scores on folds reads.
Usage: ``df = make_folds(labels, n_folds=5, seed=42, group_col="group")``; ``df, classes = load_fold_table(cfg)``
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from kpipe import paths
from kpipe.config import Config
from kpipe.data.ingest import load_classes, load_train
from kpipe.errors import KpipeError, preview
from kpipe.io import read_csv_ids


def make_folds(df: pd.DataFrame, n_folds: int, seed: int, group_col: str | None = None) -> pd.DataFrame:
    """Add a `fold` column: stratified by label, and grouped by `group_col` when given.

    Deterministic for a given (df, n_folds, seed). A K larger than the smallest class allows
    is refused, naming that class.
    """
    if n_folds < 2:
        raise KpipeError(f"folds.n_folds={n_folds}: need at least 2 folds.")
    counts = df["label"].value_counts()
    small = counts[counts < n_folds]
    if not small.empty:
        worst = small.idxmin()
        raise KpipeError(
            f"folds.n_folds={n_folds} is more than class '{worst}' allows: it has only {small.min()} images "
            f"({len(small)} classes have fewer than {n_folds}). Lower folds.n_folds, or add images to those classes."
        )
    y = df["label"].to_numpy()
    fold = np.full(len(df), -1, dtype=int)
    if group_col:
        n_groups = df[group_col].nunique()
        if n_groups < n_folds:
            raise KpipeError(
                f"folds.n_folds={n_folds}, but the {len(df)} images fall into only {n_groups} groups (column "
                f"'{group_col}': the competition's group column and the audit's near-duplicate groups), and no "
                f"group may be split across folds. Lower folds.n_folds to {max(n_groups, 2)} or less, check the "
                "group column, or re-run `kpipe audit` with a lower --threshold / higher --min-similarity."
            )
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(df)), y, groups=df[group_col].to_numpy())
    else:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(df)), y)
    for k, (_, val_idx) in enumerate(splits):
        fold[val_idx] = k
    return df.assign(fold=fold)


def merge_groups(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One group id per row: rows sharing a value in ANY of `columns` end up in one group.

    (The competition's own group column and the audit's duplicate groups are both honoured.)
    The group id is the smallest row id in the component, so it is stable across runs.
    """
    n = len(df)
    rows, cols = [], []
    for col in columns:
        codes = pd.factorize(df[col].astype(str))[0]
        first = pd.Series(np.arange(n)).groupby(codes).transform("min").to_numpy()
        rows.append(np.arange(n))
        cols.append(first)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    ids = df["id"].astype(str).to_numpy()
    return pd.Series(comp, index=df.index).map(pd.Series(ids).groupby(comp).min())


def apply_label_changes(df: pd.DataFrame, changes: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply cleaned labels (id, label, action in {relabel, drop}); return (df, per-class change counts)."""
    changes = changes.drop_duplicates("id", keep="last").set_index("id")
    drop_ids = set(changes.index[changes["action"] == "drop"])
    relabel = changes.loc[changes["action"] == "relabel", "label"]
    before = df["label"]
    out = df[~df["id"].isin(drop_ids)].copy()
    new = out["id"].map(relabel)
    out["label"] = new.where(new.notna(), out["label"])
    moved = out.loc[out["label"] != before.loc[out.index]]
    summary = (
        pd.DataFrame(
            {
                "relabelled_from": moved.groupby(before.loc[moved.index]).size(),
                "relabelled_to": moved.groupby("label").size(),
                "dropped": df[df["id"].isin(drop_ids)].groupby("label").size(),
            }
        )
        .fillna(0)
        .astype(int)
    )
    return out.reset_index(drop=True), summary


def load_fold_table(cfg: Config) -> tuple[pd.DataFrame, list[str]]:
    """folds/<comp>.csv with each id's image path and class index (`y`), and the class list.

    What train, oof-tta and relabel read: it fails clearly when the folds are missing or stale.
    """
    if not paths.folds_csv(cfg).is_file():
        raise KpipeError(
            f"{paths.folds_csv(cfg)}: no folds yet. Run `kpipe folds --comp {cfg.competition.name}` first."
        )
    df = read_csv_ids(paths.folds_csv(cfg))
    classes = load_classes(cfg)
    files = load_train(cfg).df.set_index("id")["path"]
    missing = df.loc[~df["id"].isin(files.index), "id"].tolist()
    if missing:
        raise KpipeError(
            f"{paths.folds_csv(cfg)}: {len(missing)} ids have no usable train image now ({preview(missing)}). "
            "Re-run `kpipe folds` (and re-train)."
        )
    unknown = sorted(set(df["label"]) - set(classes))
    if unknown:
        raise KpipeError(
            f"{paths.folds_csv(cfg)}: labels {preview(unknown)} are not in the class list. Re-run `kpipe folds`."
        )
    df = df.assign(
        path=df["id"].map(files),
        fold=df["fold"].astype(int),
        y=df["label"].map({c: i for i, c in enumerate(classes)}).astype(int),
    )
    return df, classes


def check_sample(table: pd.DataFrame, folds: list[int], n: int, seed: int = 0) -> dict[int, list[str]]:
    """About n validation image paths, split evenly over `folds`, each fold's drawn from its own rows. A negative
    fold (paths.FULL_FOLD, a model trained on every row) has no validation rows and draws from all, unless the
    table has rows of its own (a package's check/): the precision and runtime checks compare two numeric forms of
    one model, which any real image can show."""
    per_fold = max(1, math.ceil(n / max(len(folds), 1)))
    out = {}
    for k in folds:
        rows = table[table["fold"].astype(int) == k]
        rows = table if k < 0 and rows.empty else rows
        out[k] = rows.sample(min(per_fold, len(rows)), random_state=seed)["path"].tolist()
    return out
