"""Stratified K-fold split, grouped so duplicates never straddle folds.

Reads the ingested train labels, leaves out what ingest and `kpipe audit` found unusable,
applies the cleaned labels of `kpipe relabel --apply` when there are any, and writes
folds/<comp>.csv (id, label, fold[, group]), the class list folds/<comp>.classes.json and
one report of every train row left out, folds/<comp>.excluded.csv (id, label, path, reason).

Usage: ``kpipe folds --comp demo folds.n_folds=5``
"""

from __future__ import annotations

import json

import pandas as pd
from rich.table import Table

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console, print_problems, safe, warn
from kpipe.data.folds import apply_label_changes, make_folds, merge_groups
from kpipe.data.ingest import Ingest, check_fingerprint, fingerprint, load_train, save_classes
from kpipe.errors import Problem
from kpipe.io import read_csv_ids, write_csv

# ------------------------------------------------------------------ stage


def _apply_audit(ing: Ingest, cfg: Config) -> list[str]:
    """Leave out what the audit found unreadable; return the group columns to honour."""
    group_cols = ["group"] if "group" in ing.df.columns else []
    unreadable = paths.audit_table(cfg, "unreadable")
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
            ing.problems.append(
                Problem(
                    "unreadable images",
                    f"{int(hit.sum())} images the audit could not decode; left out",
                    f"See {unreadable}.",
                    "error",
                    tuple(ing.df.loc[hit, "id"]),
                )
            )
            ing.df = ing.df[~hit].reset_index(drop=True)
    groups = paths.audit_table(cfg, "groups")
    if groups.is_file():
        g = read_csv_ids(groups).drop_duplicates("id").set_index("id")["group"]
        ing.df["dup_group"] = ing.df["id"].map(g).fillna(ing.df["id"])
        group_cols.append("dup_group")
    return group_cols


def _check_sources(cfg: Config) -> None:
    """The audit's tables and labels_clean.csv must come from today's training data (ingest.fingerprint)."""
    current = None
    comp = cfg.competition.name
    summary, clean = paths.audit_summary(cfg), paths.clean_labels_csv(cfg)
    found = (
        [(summary, paths.audit_dir(cfg), f"kpipe audit --comp {comp}", "")]
        if paths.audit_dir(cfg).is_dir()
        else []
    )
    if cfg.folds.clean_labels and clean.is_file():
        found.append(
            (
                paths.clean_labels_source(cfg),
                clean,
                f"kpipe relabel -c <exp.yaml> --comp {comp} --apply",
                ", or set folds.clean_labels=false to use the original labels",
            )
        )
    for record, what, rerun, alternative in found:
        saved = json.loads(record.read_text()) if record.is_file() else {}
        if "train_fingerprint" not in saved:
            warn(
                safe(
                    f"{what} does not say which training data it was computed from (made by an older kpipe, or "
                    f"{record.name} is missing): re-run `{rerun}` if the data changed since."
                )
            )
            continue
        current = current or fingerprint(cfg)
        check_fingerprint(saved["train_fingerprint"], current, what, rerun, alternative)


def build_folds(cfg: Config) -> tuple[pd.DataFrame, Ingest]:
    """Everything `kpipe folds` computes, without writing: (folds table, ingest result)."""
    _check_sources(cfg)
    ing = load_train(cfg)
    group_cols = _apply_audit(ing, cfg)
    clean = paths.clean_labels_csv(cfg)
    if cfg.folds.clean_labels and clean.is_file():
        ing.df, summary = apply_label_changes(ing.df, read_csv_ids(clean))
        console.print(
            f"[bold]cleaned labels[/] from {clean}: {int(summary['relabelled_to'].sum())} relabelled, "
            f"{int(summary['dropped'].sum())} dropped"
        )
    df = ing.df[["id", "label"]].copy()
    if group_cols:
        df["group"] = merge_groups(ing.df, group_cols).to_numpy()
    folds = make_folds(df, cfg.folds.n_folds, cfg.folds.seed, "group" if group_cols else None)
    return folds, ing


def fold_table(folds: pd.DataFrame, classes: list[str], n_folds: int) -> Table:
    counts = pd.crosstab(folds["label"], folds["fold"]).reindex(
        index=classes, columns=range(n_folds), fill_value=0
    )
    table = Table(title="images per class and fold")
    table.add_column("class")
    for k in range(n_folds):
        table.add_column(f"fold {k}", justify="right")
    table.add_column("total", justify="right")
    for cls, row in counts.iterrows():
        table.add_row(safe(cls), *[str(v) for v in row.tolist()], str(int(row.sum())))
    table.add_row(
        "[bold]all", *[f"[bold]{v}" for v in counts.sum().tolist()], f"[bold]{int(counts.values.sum())}"
    )
    return table


def run(cfg: Config) -> pd.DataFrame:
    folds, ing = build_folds(cfg)
    print_problems(ing.problems)
    write_csv(paths.folds_csv(cfg), folds)
    save_classes(cfg, ing.classes)
    write_csv(paths.excluded_csv(cfg), ing.excluded)
    console.print(fold_table(folds, ing.classes, cfg.folds.n_folds))
    console.print(
        f"wrote {paths.folds_csv(cfg)} ({len(folds)} rows, {cfg.folds.n_folds} folds"
        f"{', grouped' if 'group' in folds.columns else ''}); "
        f"{len(ing.excluded)} rows left out, listed in {paths.excluded_csv(cfg)}"
    )
    return folds
