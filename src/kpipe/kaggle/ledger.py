"""The submissions ledger: one CSV row per Kaggle submission, with what produced it and its scores.

`submissions/ledger.csv` has a fixed column list (`COLUMNS`). Every change is a
read-modify-write under an exclusive lock on `ledger.csv.lock` (`io.exclusive`, on every OS),
finished by an atomic replace, so two kpipe processes appending at once both land and a reader
never sees a torn file.
`provenance` gives a submission's sha256 and its sidecar's runs/CV, `git_state` the commit;
`merge_remote` (pure) folds Kaggle's submission list into the ledger; `render_table` and
`plot_cv_vs_lb` show it.
Usage: ``ledger.append(paths.ledger_csv(cfg), [row]); df = ledger.read(path)``
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from kpipe.console import safe
from kpipe.errors import KpipeError
from kpipe.io import atomic_path, exclusive, read_csv_ids, write_csv

COLUMNS: tuple[str, ...] = (
    "time_utc",  # ISO 8601, UTC, when the submission was made
    "competition",  # Kaggle slug
    "file",  # path as given to `kpipe submit`, or Kaggle's file name for external rows
    "sha256",  # of the uploaded bytes; empty when unknown (external)
    "message",
    "git_commit",  # HEAD when submitted; empty outside a git repository
    "git_dirty",  # "true"/"false": uncommitted changes at submit time; empty outside git
    "runs",  # ';'-joined run folders from the submission's sidecar JSON
    "cv",
    "metric",
    "source",  # "kpipe" or "external" (made with the kaggle CLI or the website)
    "kaggle_ref",  # Kaggle's submission id
    "status",  # uploading (kpipe submit in progress, or cut off) / pending / complete / error
    "public_score",
    "private_score",
    "error",  # Kaggle's error description for a submission it could not score
    # Code competitions (`kpipe submit --kernel`): the notebook and version Kaggle re-runs, and the package
    # dataset it reads. For these rows `sha256` is of "<kernel>@<version>:<package_sha256>" (no file is uploaded).
    "kernel",
    "kernel_version",
    "package_sha256",
)
# A submission made outside kpipe is matched to a ref-less ledger row of the same file name
# when the two times are this close.
MATCH_WINDOW = timedelta(minutes=10)


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime | None:
    """A ledger/Kaggle time as an aware UTC datetime; naive times are UTC (Kaggle sends them so)."""
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return str(value)


def make_row(values: Mapping[str, Any]) -> dict[str, str]:
    """A full ledger row (every column, all text) from a partial mapping; unknown keys are a bug."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise ValueError(f"not ledger columns: {sorted(unknown)}")
    return {c: _cell(values.get(c)) for c in COLUMNS}


# ------------------------------------------------------------------ storage


def read(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The ledger as text columns in `COLUMNS` order; an absent file is an empty ledger."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame({c: pd.Series(dtype=str) for c in COLUMNS})
    df = read_csv_ids(path)
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown:
        raise KpipeError(
            f"{path}: unexpected columns {unknown}; a ledger has {', '.join(COLUMNS)}. "
            "Was it edited by hand? Fix the header or move the file aside."
        )
    for c in COLUMNS:  # a ledger from an older kpipe may lack newer columns
        if c not in df.columns:
            df[c] = ""
    return df[list(COLUMNS)]


def transact(path: str | os.PathLike[str], fn: Callable[[pd.DataFrame], pd.DataFrame]) -> pd.DataFrame:
    """Replace the ledger with fn(ledger), atomically and exclusively; return the new ledger."""
    path = Path(path)
    with exclusive(path.with_name(path.name + ".lock")):
        new = fn(read(path))[list(COLUMNS)]
        write_csv(path, new)
    return new


def append(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    new_rows = pd.DataFrame([make_row(r) for r in rows], columns=list(COLUMNS))
    return transact(path, lambda df: pd.concat([df, new_rows], ignore_index=True))


def update_ref(
    path: str | os.PathLike[str], competition: str, ref: str, values: Mapping[str, Any]
) -> pd.DataFrame:
    """Set `values` on the row(s) of Kaggle submission `ref`."""
    cells = {k: v for k, v in make_row(values).items() if k in values}

    def apply(df: pd.DataFrame) -> pd.DataFrame:
        hit = (df["competition"] == competition) & (df["kaggle_ref"] == str(ref))
        for k, v in cells.items():
            df.loc[hit, k] = v
        return df

    return transact(path, apply)


def find_sha(df: pd.DataFrame, competition: str, sha256: str) -> pd.DataFrame:
    """Rows that submitted (or are submitting) these bytes to this competition."""
    return df[(df["competition"] == competition) & (df["sha256"] == sha256)]


def reserve(path: str | os.PathLike[str], row: Mapping[str, Any], force: bool = False) -> pd.DataFrame:
    """The duplicate check and the append, under one lock: the earlier rows with row's sha256 for its
    competition when there are any and not `force` (nothing written), else append `row` (status
    "uploading" until `settle`) and return no rows. Two concurrent submits of one file: one wins."""
    path, new = Path(path), make_row({**row, "status": "uploading"})
    with exclusive(path.with_name(path.name + ".lock")):
        df = read(path)
        same = find_sha(df, new["competition"], new["sha256"])
        if len(same) and not force:
            return same
        write_csv(path, pd.concat([df, pd.DataFrame([new], columns=list(COLUMNS))], ignore_index=True))
    return same.iloc[0:0]


def release(path: str | os.PathLike[str], row: Mapping[str, Any]) -> pd.DataFrame:
    """Drop the row `reserve` wrote for `row` (nothing was uploaded)."""
    key = make_row(row)
    return transact(
        path,
        lambda df: df[
            ~(
                (df["competition"] == key["competition"])
                & (df["sha256"] == key["sha256"])
                & (df["time_utc"] == key["time_utc"])
                & (df["status"] == "uploading")
            )
        ],
    )


def settle(path: str | os.PathLike[str], row: Mapping[str, Any], values: Mapping[str, Any]) -> pd.DataFrame:
    """Set `values` on the row `reserve` wrote for `row` (same competition, sha256 and time, still uploading)."""
    key, cells = make_row(row), {k: v for k, v in make_row(values).items() if k in values}

    def apply(df: pd.DataFrame) -> pd.DataFrame:
        hit = (
            (df["competition"] == key["competition"])
            & (df["sha256"] == key["sha256"])
            & (df["time_utc"] == key["time_utc"])
            & (df["status"] == "uploading")
        )
        for k, v in cells.items():
            df.loc[hit, k] = v
        return df

    return transact(path, apply)


# ------------------------------------------------------------------ sync with Kaggle (pure)


def merge_remote(
    df: pd.DataFrame,
    remote: list[dict[str, str]],
    competition: str,
    enrich: Callable[[dict[str, str]], dict[str, str]] | None = None,
) -> pd.DataFrame:
    """Fold Kaggle's submission list into the ledger.

    `remote` rows carry the ledger's Kaggle columns (kaggle_ref, time_utc, file, message,
    status, public_score, private_score, error). A ledger row with the same ref is updated;
    else a ref-less row of this competition with the same file name within MATCH_WINDOW
    gets the ref; else the submission is added as source=external (`enrich` may fill in
    sha256/runs/cv from a local file of the same name).
    """
    df = df.copy()
    kaggle_cols = ["status", "public_score", "private_score", "error"]
    new_rows = []
    for sub in remote:
        ref = sub["kaggle_ref"]
        mine = df["competition"] == competition
        hit = mine & (df["kaggle_ref"] == ref)
        if not hit.any():
            idx = _match_refless(df[mine], sub)
            hit = pd.Series(df.index == idx, index=df.index)
        if hit.any():
            df.loc[hit, "kaggle_ref"] = ref
            for c in kaggle_cols:
                df.loc[hit, c] = sub.get(c, "")
            continue
        row = {k: v for k, v in sub.items() if k in COLUMNS}
        row.update(competition=competition, source="external")
        if enrich is not None:
            row.update(enrich(sub))
        new_rows.append(make_row(row))
    if new_rows:
        added = pd.DataFrame(new_rows, columns=list(COLUMNS))
        added = added.sort_values(["time_utc", "kaggle_ref"], key=_natural, kind="stable")
        df = pd.concat([df, added], ignore_index=True)
    return df


def _natural(col: pd.Series) -> pd.Series:
    # Kaggle refs are increasing integers: compare them as numbers, not text.
    return col.str.zfill(20) if col.name == "kaggle_ref" else col


def _match_refless(mine: pd.DataFrame, sub: dict[str, str]) -> Any:
    """Index of the ref-less row with this file name submitted closest in time (within the window)."""
    when = parse_time(sub.get("time_utc", ""))
    if when is None:
        return None
    name = Path(sub.get("file", "")).name
    best, best_gap = None, MATCH_WINDOW
    for idx, row in mine[mine["kaggle_ref"] == ""].iterrows():
        t = parse_time(row["time_utc"])
        if t is None or Path(row["file"]).name != name:
            continue
        gap = abs(when - t)
        if gap <= best_gap:
            best, best_gap = idx, gap
    return best


# ------------------------------------------------------------------ provenance of a submission


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state(cwd: Path | None = None) -> tuple[str, str]:
    """(HEAD commit, "true"/"false" for uncommitted changes) around cwd; empty strings outside git."""

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):  # no git on this machine
            return None

    head, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    commit = head.stdout.strip() if head is not None and head.returncode == 0 else ""
    if status is None or status.returncode != 0:
        return commit, ""
    return commit, "true" if status.stdout.strip() else "false"


def provenance(path: Path) -> dict[str, Any]:
    """sha256 of a submission file, and runs, cv and metric from the sidecar JSON `kpipe infer`
    writes beside it (submissions/<name>.json); no sidecar, or one recording another sha256, leaves those empty."""
    out: dict[str, Any] = {"sha256": sha256_file(path)}
    side = path.with_suffix(".json")
    if not side.is_file():
        return out
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KpipeError(
            f"{side}: not valid JSON ({e}). It is the sidecar of {path.name}; fix or delete it."
        ) from None
    if (
        data.get("sha256") != out["sha256"]
    ):  # the sidecar describes other bytes: its runs and CV are not this file's
        return out
    runs = data.get("runs") or []
    return {
        **out,
        "runs": [runs] if isinstance(runs, str) else runs,
        "cv": data.get("cv"),
        "metric": data.get("metric"),
    }


def check_sidecar(path: Path) -> None:
    """KpipeError when a submission's sidecar JSON does not record this file's sha256: the CSV was rewritten
    after it (an infer killed between the two writes, or an edit), so its runs and CV would be wrong."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return
    try:
        recorded = json.loads(side.read_text(encoding="utf-8")).get("sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise KpipeError(
            f"{side}: not a valid sidecar ({e}). It is the sidecar of {path.name}; re-run "
            "`kpipe infer` to write both again, or delete it to submit without provenance."
        ) from None
    actual = sha256_file(path)
    if recorded != actual:
        said = (
            f"records sha256 {recorded[:12]}…"
            if isinstance(recorded, str)
            else "records no sha256 (older kpipe)"
        )
        raise KpipeError(
            f"{side} {said}, but {path.name} has sha256 {actual[:12]}…: the sidecar describes another "
            "file (was infer stopped between writing the CSV and its sidecar, or the CSV edited?), so "
            "its runs and CV would go into the ledger wrongly. Nothing was uploaded. Re-run `kpipe infer` "
            "to write both again, or delete the sidecar to submit without provenance."
        )


def default_message(path: Path) -> str:
    """A submission message from the sidecar, e.g. 'r50: runs r50+b3, CV 0.9123 accuracy'."""
    prov = provenance(path)
    said = []
    if prov.get("runs"):
        said.append("runs " + "+".join(Path(r).name for r in prov["runs"]))
    if prov.get("cv") is not None:
        try:
            said.append(f"CV {float(prov['cv']):.4f} {prov.get('metric') or ''}".rstrip())
        except (TypeError, ValueError):
            said.append(f"CV {prov['cv']}")
    return f"{path.stem}: {', '.join(said)}" if said else path.stem


def local_provenance(sub: Mapping[str, str], sub_dir: Path) -> dict[str, Any]:
    """Provenance of a submission made outside kpipe whose file still sits, unchanged, in `sub_dir`."""
    local = sub_dir / Path(sub["file"]).name
    when = parse_time(sub["time_utc"])
    if not local.is_file() or when is None:
        return {}
    size_ok = not sub.get("total_bytes") or int(sub["total_bytes"]) == local.stat().st_size
    mtime = datetime.fromtimestamp(local.stat().st_mtime, UTC)
    if not size_ok or mtime > when + timedelta(minutes=1):  # rewritten since: not what was uploaded
        return {}
    return {"file": str(local), **provenance(local)}


# ------------------------------------------------------------------ views


def best_index(df: pd.DataFrame, col: str, higher_is_better: bool) -> Any:
    """Index of the best numeric value of `col`, or None when the column has none."""
    values = pd.to_numeric(df[col], errors="coerce")
    if values.notna().sum() == 0:
        return None
    return values.idxmax() if higher_is_better else values.idxmin()


def render_table(df: pd.DataFrame, higher_is_better: bool, title: str) -> Table:
    """CV vs public vs private, one row per submission; the best of each column starred."""
    best = {c: best_index(df, c, higher_is_better) for c in ("cv", "public_score", "private_score")}
    table = Table(title=title, title_justify="left")
    for name, justify in [
        ("ref", "right"),
        ("UTC", "left"),
        ("file", "left"),
        ("message", "left"),
        ("src", "left"),
        ("status", "left"),
        ("CV", "right"),
        ("public", "right"),
        ("private", "right"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for idx, row in df.iterrows():
        status = row["status"] + (f": {row['error'][:40]}" if row["error"] else "")
        scores = [_score_cell(row[c], idx == best[c]) for c in ("cv", "public_score", "private_score")]
        text = [
            safe(t) for t in (Path(row["file"]).name, row["message"][:30], status)
        ]  # user text, not markup
        table.add_row(
            row["kaggle_ref"],
            row["time_utc"][5:16].replace("T", " "),
            text[0],
            text[1],
            "kpipe" if row["source"] == "kpipe" else "ext",
            text[2],
            *scores,
        )
    return table


def _score_cell(value: str, is_best: bool) -> str:
    if not value:
        return ""
    try:
        text = f"{float(value):.5f}"
    except ValueError:
        text = value
    return f"[bold green]* {text}[/]" if is_best else text


def plot_cv_vs_lb(df: pd.DataFrame, out: Path, title: str, higher_is_better: bool = True) -> bool:
    """Scatter CV against public (and private) score; False when no row has both CV and a score."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas by default

    cv = pd.to_numeric(df["cv"], errors="coerce")
    pub = pd.to_numeric(df["public_score"], errors="coerce")
    priv = pd.to_numeric(df["private_score"], errors="coerce")
    has_pub, has_priv = cv.notna() & pub.notna(), cv.notna() & priv.notna()
    if not (has_pub.any() or has_priv.any()):
        return False
    fig = Figure(figsize=(6, 5), dpi=100)
    ax = fig.subplots()
    ax.scatter(cv[has_pub], pub[has_pub], label="public LB", color="tab:blue")
    if has_priv.any():
        ax.scatter(cv[has_priv], priv[has_priv], label="private LB", facecolors="none", edgecolors="tab:red")
    for idx in df.index[has_pub]:
        ax.annotate(
            df.at[idx, "kaggle_ref"] or str(idx),
            (cv[idx], pub[idx]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    best = best_index(df[has_pub], "public_score", higher_is_better)
    if best is not None:
        ax.scatter(
            [cv[best]],
            [pub[best]],
            marker="*",
            s=220,
            color="gold",
            edgecolors="black",
            zorder=3,
            label="best public",
        )
    both = pd.concat([cv[has_pub | has_priv], pub[has_pub], priv[has_priv]])
    lo, hi = float(both.min()), float(both.max())
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1, label="LB = CV")
    ax.set_xlabel("CV")
    ax.set_ylabel("leaderboard score")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return True
