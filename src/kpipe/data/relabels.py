"""The relabel decisions, <work_dir>/relabels.csv, and the cleaned labels they make, labels_clean.csv.

relabels.csv (id, given, suggested, score, decision, source, and a person's own columns) is written by
`kpipe relabel` and by the review page, and edited by people: this module is its one reader and writer.
decision: accept = move to `suggested`, drop = leave the image out, keep = label is right, empty = undecided.
labels_clean.csv (id, label, action in {relabel, drop}) is what `kpipe folds` applies.
The review server changes one row at a time with `set_decision`: under a file lock it re-reads the
file, changes that id's rows only and writes atomically, so two tabs never lose each other's decisions.
Usage: ``table = read_relabels(paths.relabels_csv(cfg)); write_relabels(path, accept_above_threshold(table, 0.9))``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from kpipe import paths
from kpipe.errors import KpipeError, preview
from kpipe.io import read_csv_ids, write_csv

COLUMNS = ["id", "given", "suggested", "score", "decision", "source"]


DECISIONS = ("", "accept", "drop", "keep")


SOURCES = ("cleanlab", "manual")


def sort_relabels(df: pd.DataFrame) -> pd.DataFrame:
    """Best first: score descending (manual rows without a score on top), then id."""
    s = pd.to_numeric(df["score"], errors="coerce")
    order = df.assign(_s=s).sort_values(
        ["_s", "id"], ascending=[False, True], na_position="first", kind="mergesort"
    )
    return order.drop(columns="_s").reset_index(drop=True)


def normalise_relabels(raw: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check a relabels.csv a person may have edited; tidy decision/source; parse score (NaN if blank)."""
    missing = [c for c in ("id", "given", "suggested", "decision") if c not in raw.columns]
    if missing:
        raise KpipeError(f"{where}: no column {', '.join(missing)}; expected {', '.join(COLUMNS)}.")
    extra = [c for c in raw.columns if c not in COLUMNS]  # a person's own columns (notes...) are kept
    df = raw.reindex(columns=[*COLUMNS, *extra], fill_value="").astype(str)
    tidy = ["given", "suggested", "score", "decision", "source"]  # not the id: ids stay byte for byte
    df[tidy] = df[tidy].apply(lambda c: c.str.strip())
    df["decision"] = df["decision"].str.lower()
    df["source"] = (
        df["source"].str.lower().replace("", "manual")
    )  # a hand-added row without a source is manual
    for i, row in df.iterrows():
        line = f"{where} line {int(i) + 2} (id '{row['id']}')"
        if row["decision"] not in DECISIONS:
            raise KpipeError(
                f"{line}: decision '{row['decision']}' is not one of accept, drop, keep or empty."
            )
        if row["source"] not in SOURCES:
            raise KpipeError(f"{line}: source '{row['source']}' is not cleanlab or manual.")
        if not row["id"]:
            raise KpipeError(f"{line}: empty id.")
    score = pd.to_numeric(df["score"].replace("", np.nan), errors="coerce")
    bad = score.isna() & (df["score"] != "")
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise KpipeError(
            f"{where} line {i + 2}: score '{df['score'].iloc[i]}' is not a number (leave it empty)."
        )
    return df.assign(score=score)


def merge_relabels(existing: pd.DataFrame | None, fresh: pd.DataFrame) -> pd.DataFrame:
    """Fresh suggestions merged into a table a person may have edited.

    Kept as they are: every manual row and every row with a decision (its score refreshed if the
    id is still a suspect). Undecided cleanlab rows are replaced by the fresh suggestions, so
    an image the new model no longer doubts leaves the list.
    """
    new = fresh.assign(decision="", source="cleanlab").reindex(columns=COLUMNS)
    if existing is None or existing.empty:
        return sort_relabels(new)
    kept = existing[(existing["decision"] != "") | (existing["source"] == "manual")].copy()
    now = kept["id"].map(fresh.set_index("id")["score"]).astype(float)
    kept["score"] = now.where((kept["source"] == "cleanlab") & now.notna(), kept["score"]).astype(float)
    new = new[~new["id"].isin(set(kept["id"]))]
    return sort_relabels(pd.concat([kept, new], ignore_index=True))


def accept_above_threshold(df: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """decision=accept for every undecided row with score >= threshold; decided rows untouched."""
    if not 0.0 <= threshold <= 1.0:
        raise KpipeError(
            f"--accept-above {threshold}: scores lie in [0, 1]; pick a threshold there (e.g. 0.9)."
        )
    hit = (df["decision"] == "") & (pd.to_numeric(df["score"], errors="coerce") >= threshold)
    return df.assign(decision=df["decision"].where(~hit, "accept"))


def build_clean_labels(
    df: pd.DataFrame, train_labels: dict[str, str], classes: list[str], where: str = "relabels.csv"
) -> pd.DataFrame:
    """labels_clean rows (id, label, action) from accepted and dropped rows, sorted by id.

    Every row that takes effect, and every manual row, must name a training id; an accepted row
    must name a known class. One id with two different effective decisions is refused.
    """
    known = set(classes)
    out: dict[str, tuple[str, str, int]] = {}
    for i, row in df.reset_index(drop=True).iterrows():
        line = f"{where} line {int(i) + 2} (id '{row['id']}', source {row['source']})"
        effective = row["decision"] in ("accept", "drop")
        if not (effective or row["source"] == "manual"):
            continue
        if row["id"] not in train_labels:
            raise KpipeError(
                f"{line}: '{row['id']}' is not a usable training image id. Fix the id or delete the row."
            )
        if row["decision"] == "accept" and row["suggested"] not in known:
            raise KpipeError(
                f"{line}: suggested class '{row['suggested']}' is not a class "
                f"({preview(classes)}). Fix it, or use decision=drop."
            )
        if not effective:
            continue
        change = (
            ("relabel", row["suggested"])
            if row["decision"] == "accept"
            else ("drop", train_labels[row["id"]])
        )
        if row["id"] in out and out[row["id"]][:2] != change:
            raise KpipeError(
                f"{line}: contradicts line {out[row['id']][2]} for the same id "
                f"({out[row['id']][0]} vs {change[0]} {change[1]}). Keep one of them."
            )
        out.setdefault(row["id"], (*change, int(i) + 2))
    rows = [(k, v[1], v[0]) for k, v in sorted(out.items())]
    return pd.DataFrame(rows, columns=["id", "label", "action"])


def read_relabels(path: Path) -> pd.DataFrame | None:
    return normalise_relabels(read_csv_ids(path), str(path)) if path.is_file() else None


def write_relabels(path: Path, df: pd.DataFrame) -> None:
    """Scores with 4 decimals, blanks for none: the same table always gives the same bytes."""
    s = pd.to_numeric(df["score"], errors="coerce")
    columns = [*COLUMNS, *[c for c in df.columns if c not in COLUMNS]]
    write_csv(path, df.assign(score=[f"{v:.4f}" if pd.notna(v) else "" for v in s])[columns].fillna(""))


LOCK_TIMEOUT_S = 30.0


class UnknownId(KpipeError):
    """A decision for an id relabels.csv does not hold (the file was re-made, or the id is made up)."""


def locked(path: Path) -> FileLock:
    """Hold this around every read-change-write of relabels.csv (`kpipe relabel` and the review server)."""
    return FileLock(str(paths.lock_file(path)), timeout=LOCK_TIMEOUT_S)


def set_decision(path: Path, image_id: str, decision: str, suggested: str | None = None) -> pd.DataFrame:
    """Set the decision (and optionally the suggested class) of one id's rows; every other row stays as read.

    The file is re-read under the lock, so a decision another writer saved a moment ago is kept.
    The caller checks that `suggested` is a known class; an id the table does not hold is refused.
    """
    if decision not in DECISIONS:
        raise KpipeError(f"decision '{decision}' is not one of accept, drop, keep or empty.")
    with locked(path):
        table = read_relabels(path)
        if table is None:
            raise KpipeError(f"{path} does not exist. Run `kpipe relabel` first to write it.")
        hit = table["id"] == image_id
        if not hit.any():
            raise UnknownId(
                f"{path}: no row with id '{image_id}'. Reload the page: the file may have been re-made."
            )
        table.loc[hit, "decision"] = decision
        if suggested is not None:
            table.loc[hit, "suggested"] = suggested
        write_relabels(path, table)
    return table
