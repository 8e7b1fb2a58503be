"""Stratified K-fold split, grouped so duplicates never straddle folds.

Reads the ingested train labels, leaves out what ingest and `kpipe audit` found unusable,
applies the cleaned labels of `kpipe relabel --apply` when there are any, and writes
folds/<comp>.csv (id, label, fold[, group]), the class list folds/<comp>.classes.json and
one report of every train row left out, folds/<comp>.excluded.csv (id, label, path, reason).

Usage: ``kpipe folds --comp demo folds.n_folds=5``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from kpipe.config import Config
from kpipe.data.ingest import Ingest, load_classes, load_train, save_classes
from kpipe.errors import KpipeError, Problem, preview
from kpipe.io import read_csv_ids, write_csv

console = Console()


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
    summary = pd.DataFrame({
        "relabelled_from": moved.groupby(before.loc[moved.index]).size(),
        "relabelled_to": moved.groupby("label").size(),
        "dropped": df[df["id"].isin(drop_ids)].groupby("label").size(),
    }).fillna(0).astype(int)
    return out.reset_index(drop=True), summary


def load_fold_table(cfg: Config) -> tuple[pd.DataFrame, list[str]]:
    """folds/<comp>.csv with each id's image path and class index (`y`), and the class list.

    What train, oof-tta and relabel read: it fails clearly when the folds are missing or stale.
    """
    if not cfg.folds_csv.is_file():
        raise KpipeError(f"{cfg.folds_csv}: no folds yet. Run `kpipe folds --comp {cfg.competition.name}` first.")
    df = read_csv_ids(cfg.folds_csv)
    classes = load_classes(cfg)
    paths = load_train(cfg).df.set_index("id")["path"]
    missing = df.loc[~df["id"].isin(paths.index), "id"].tolist()
    if missing:
        raise KpipeError(f"{cfg.folds_csv}: {len(missing)} ids have no usable train image now ({preview(missing)}). "
                         "Re-run `kpipe folds` (and re-train).")
    unknown = sorted(set(df["label"]) - set(classes))
    if unknown:
        raise KpipeError(f"{cfg.folds_csv}: labels {preview(unknown)} are not in the class list. Re-run `kpipe folds`.")
    df = df.assign(path=df["id"].map(paths), fold=df["fold"].astype(int),
                   y=df["label"].map({c: i for i, c in enumerate(classes)}).astype(int))
    return df, classes


# ------------------------------------------------------------------ stage


def audit_dir(cfg: Config) -> Path:
    return cfg.work_dir / "audit"


def clean_labels_path(cfg: Config) -> Path:
    return cfg.work_dir / "labels_clean.csv"


def excluded_path(cfg: Config) -> Path:
    return Path(cfg.paths.folds_dir) / f"{cfg.competition.name}.excluded.csv"


def _apply_audit(ing: Ingest, cfg: Config) -> list[str]:
    """Leave out what the audit found unreadable; return the group columns to honour."""
    group_cols = ["group"] if "group" in ing.df.columns else []
    unreadable = audit_dir(cfg) / "unreadable.csv"
    if unreadable.is_file():
        bad = read_csv_ids(unreadable)
        bad = bad[bad["split"] == "train"] if "split" in bad.columns else bad
        hit = ing.df["id"].isin(set(bad["id"]))
        if hit.any():
            reasons = ing.df.loc[hit, "id"].map(bad.drop_duplicates("id").set_index("id")["reason"])
            ing.excluded = pd.concat(
                [ing.excluded, ing.df.loc[hit, ["id", "label", "path"]].assign(reason="audit: " + reasons)],
                ignore_index=True,
            )
            ing.problems.append(Problem("unreadable images", f"{int(hit.sum())} images the audit could not decode; left out",
                                        f"See {unreadable}.", "error", tuple(ing.df.loc[hit, "id"])))
            ing.df = ing.df[~hit].reset_index(drop=True)
    groups = audit_dir(cfg) / "groups.csv"
    if groups.is_file():
        g = read_csv_ids(groups).drop_duplicates("id").set_index("id")["group"]
        ing.df["dup_group"] = ing.df["id"].map(g).fillna(ing.df["id"])
        group_cols.append("dup_group")
    return group_cols


def build_folds(cfg: Config) -> tuple[pd.DataFrame, Ingest]:
    """Everything `kpipe folds` computes, without writing: (folds table, ingest result)."""
    ing = load_train(cfg)
    group_cols = _apply_audit(ing, cfg)
    clean = clean_labels_path(cfg)
    if cfg.folds.clean_labels and clean.is_file():
        ing.df, summary = apply_label_changes(ing.df, read_csv_ids(clean))
        console.print(f"[bold]cleaned labels[/] from {clean}: {int(summary['relabelled_to'].sum())} relabelled, "
                      f"{int(summary['dropped'].sum())} dropped")
    df = ing.df[["id", "label"]].copy()
    if group_cols:
        df["group"] = merge_groups(ing.df, group_cols).to_numpy()
    folds = make_folds(df, cfg.folds.n_folds, cfg.folds.seed, "group" if group_cols else None)
    return folds, ing


def fold_table(folds: pd.DataFrame, classes: list[str], n_folds: int) -> Table:
    counts = pd.crosstab(folds["label"], folds["fold"]).reindex(index=classes, columns=range(n_folds), fill_value=0)
    table = Table(title="images per class and fold")
    table.add_column("class")
    for k in range(n_folds):
        table.add_column(f"fold {k}", justify="right")
    table.add_column("total", justify="right")
    for cls, row in counts.iterrows():
        table.add_row(str(cls), *[str(v) for v in row.tolist()], str(int(row.sum())))
    table.add_row("[bold]all", *[f"[bold]{v}" for v in counts.sum().tolist()], f"[bold]{int(counts.values.sum())}")
    return table


def print_problems(problems: list[Problem]) -> None:
    for p in problems:
        style = "red" if p.severity == "error" else "yellow"
        console.print(p.render(), style=style, markup=False, highlight=False)


def run(cfg: Config) -> pd.DataFrame:
    folds, ing = build_folds(cfg)
    print_problems(ing.problems)
    write_csv(cfg.folds_csv, folds)
    save_classes(cfg, ing.classes)
    write_csv(excluded_path(cfg), ing.excluded)
    console.print(fold_table(folds, ing.classes, cfg.folds.n_folds))
    console.print(f"wrote {cfg.folds_csv} ({len(folds)} rows, {cfg.folds.n_folds} folds"
                  f"{', grouped' if 'group' in folds.columns else ''}); "
                  f"{len(ing.excluded)} rows left out, listed in {excluded_path(cfg)}")
    return folds
