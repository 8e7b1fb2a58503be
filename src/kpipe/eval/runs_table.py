"""Every run side by side: one row per runs/<exp>/ folder, built only from what the run wrote.

`load_run` reads a run folder (config.yaml, cv.json, fold<k>/metrics.csv, run.json, oof_tta/*.csv)
into a `RunRecord`; everything after that is pure: `differing_keys` finds the config keys whose
values differ between the runs (the only ones worth showing), `build_table` makes the DataFrame
(CV overall and per fold, time, throughput, parameters, TTA views, the ledger's scores of
submissions made from the run), `sort_table` orders it and `render` draws it for the console.
A run with no cv.json, or a cv.json that covers only some folds, is listed with its status.
Usage: ``df = build_table([load_run(r) for r in paths.run_folders("runs")], ledger.read(path))``
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from rich.markup import escape
from rich.table import Table

from kpipe.errors import KpipeError
from kpipe.io import read_csv_ids
from kpipe.paths import RunDir

# Keys that differ between any two runs without saying anything about the experiment.
IGNORED_KEYS = ("name", "paths.", "infer.", "data.num_workers", "data.cache_dir")
COLUMNS = (
    "run",
    "status",
    "model",
    "params",
    "trainable",
    "img_size",
    "epochs",
    "differs",
    "wall_s",
    "img_per_s",
    "metric",
    "cv",
    "fold_mean",
    "fold_std",
    "per_fold",
    "tta_views",
    "public",
    "private",
)


@dataclass
class RunRecord:
    """What one run folder holds; None/empty where the run has not written it (yet)."""

    name: str
    root: Path
    config: dict[str, Any]  # flattened: {"model.name": "resnet18", ...}
    cv: dict[str, Any] | None = None
    metrics: dict[int, pd.DataFrame] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)  # run.json
    tta_views: list[str] = field(default_factory=list)
    folds_done: list[int] = field(default_factory=list)  # folds with their oof.csv written


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KpipeError(
            f"{path}: not valid JSON ({e}). Delete it and re-run the stage that wrote it."
        ) from None
    if not isinstance(data, dict):
        raise KpipeError(f"{path}: expected a JSON object. Delete it and re-run the stage that wrote it.")
    return data


def load_run(run: RunDir) -> RunRecord:
    """Read a run folder; a half-finished run gives a record with what is there."""
    try:
        raw = yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise KpipeError(f"{run.config}: not valid YAML ({e}). Was it edited by hand?") from None
    if not isinstance(raw, dict):
        raise KpipeError(f"{run.config}: expected a mapping of config keys. Was it edited by hand?")
    rec = RunRecord(
        run.name, run.root, flatten(raw), cv=_read_json(run.cv), facts=_read_json(run.run_json) or {}
    )
    for fd in run.fold_dirs():
        k = fd.root.name[len("fold") :]
        if not k.isdigit():
            continue
        if fd.metrics.is_file():
            rec.metrics[int(k)] = read_csv_ids(fd.metrics)
        if fd.oof.is_file():
            rec.folds_done.append(int(k))
    if run.oof_tta_dir.is_dir():
        rec.tta_views = sorted(p.stem for p in run.oof_tta_dir.glob("*.csv"))
    return rec


# ------------------------------------------------------------------ pure core


def _ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS)


def differing_keys(configs: dict[str, dict[str, Any]]) -> list[str]:
    """Flattened config keys whose value is not the same in every run (a key one run lacks counts)."""
    if len(configs) < 2:
        return []
    keys = sorted(set().union(*configs.values()))
    out = []
    for key in keys:
        if _ignored(key):
            continue
        values = [
            json.dumps(c[key], sort_keys=True, default=str) if key in c else "<missing>"
            for c in configs.values()
        ]
        if len(set(values)) > 1:
            out.append(key)
    return out


def expected_folds(config: dict[str, Any]) -> list[int]:
    folds = config.get("train.folds")
    return list(folds) if folds else list(range(int(config.get("folds.n_folds", 5))))


def status(rec: RunRecord) -> str:
    """done / partial (CV over some folds) / unfinished (no cv.json yet), with the folds done."""
    want = expected_folds(rec.config)
    done = f"{len([k for k in rec.folds_done if k in want])}/{len(want)} folds"
    if rec.cv is None:
        return f"unfinished {done}"
    return "done" if rec.cv.get("complete") else f"partial {done}"


def _throughput(metrics: dict[int, pd.DataFrame]) -> float:
    """Training images per second over every epoch of every fold, weighted by the epoch's time."""
    frames = [m for m in metrics.values() if {"seconds", "images_per_s"} <= set(m.columns)]
    if not frames:
        return math.nan
    m = pd.concat(frames)
    secs = pd.to_numeric(m["seconds"], errors="coerce").to_numpy(float)
    rate = pd.to_numeric(m["images_per_s"], errors="coerce").to_numpy(float)
    ok = np.isfinite(secs) & np.isfinite(rate)
    return float((secs[ok] * rate[ok]).sum() / secs[ok].sum()) if secs[ok].sum() > 0 else math.nan


def _wall(rec: RunRecord) -> float:
    walls = rec.facts.get("fold_wall_s")
    if walls:
        return float(sum(walls.values()))
    return math.nan


def _ledger_scores(name: str, root: Path, ledger: pd.DataFrame) -> tuple[str, str]:
    """Public/private of the latest scored ledger row whose `runs` lists this run folder."""
    if ledger.empty:
        return "", ""
    here = root.resolve()
    for _, row in ledger.iloc[::-1].iterrows():
        runs = [Path(r) for r in str(row.get("runs", "") or "").split(";") if r]
        if any(r.name == name and (not r.is_absolute() or r.resolve() == here) for r in runs):
            pub, priv = str(row.get("public_score", "") or ""), str(row.get("private_score", "") or "")
            if pub or priv:
                return pub, priv
    return "", ""


def _value_text(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return "null" if v is None else str(v)


def build_table(records: list[RunRecord], ledger: pd.DataFrame) -> pd.DataFrame:
    """One row per run, `COLUMNS`; numbers stay numbers (NaN where the run has not written them)."""
    diff = differing_keys({r.name: r.config for r in records})
    rows = []
    for r in records:
        c = r.config
        per_fold = {int(k): float(v) for k, v in (r.cv or {}).get("per_fold", {}).items()}
        scores = list(per_fold.values())
        pub, priv = _ledger_scores(r.name, r.root, ledger)
        rows.append(
            {
                "run": r.name,
                "status": status(r),
                "model": c.get("model.name", ""),
                "params": r.facts.get("params_total", math.nan),
                "trainable": r.facts.get("params_trainable", math.nan),
                "img_size": c.get("data.img_size") or "model",
                "epochs": c.get("train.epochs", math.nan),
                "differs": "  ".join(f"{k}={_value_text(c.get(k))}" for k in diff),
                "wall_s": _wall(r),
                "img_per_s": _throughput(r.metrics),
                "metric": (r.cv or {}).get("metric", c.get("competition.metric", "")),
                "cv": float(r.cv["cv"]) if r.cv and "cv" in r.cv else math.nan,
                "fold_mean": float(np.mean(scores)) if scores else math.nan,
                "fold_std": float(np.std(scores)) if len(scores) > 1 else math.nan,
                "per_fold": " ".join(f"{k}:{v:.4f}" for k, v in sorted(per_fold.items())),
                "tta_views": ",".join(r.tta_views),
                "public": pub,
                "private": priv,
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def sort_table(df: pd.DataFrame, column: str | None, reverse: bool = False) -> pd.DataFrame:
    """Sorted by `column`: numbers largest first (the best accuracy on top), text A-Z; `reverse` flips it."""
    if column is None:
        return df
    col = column
    if col not in df.columns:
        raise KpipeError(f"--sort {column}: no such column. Choose one of: {', '.join(df.columns)}.")
    numeric = pd.api.types.is_numeric_dtype(df[col])
    ascending = numeric if reverse else not numeric
    return df.sort_values(col, ascending=ascending, kind="stable", na_position="last").reset_index(drop=True)


def _fmt(col: str, v: Any) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if col in ("params", "trainable"):
        return f"{v / 1e6:.2f}M"
    if col == "wall_s":
        return f"{v / 60:.1f} min" if v >= 60 else f"{v:.0f} s"
    if col == "img_per_s":
        return f"{v:.0f}"
    if col in ("cv",):
        return f"{v:.4f}"
    return str(v)


def render(df: pd.DataFrame, title: str = "runs") -> Table:
    """The console table: CV folds as mean ± std, user text escaped."""
    table = Table(title=title)
    shown = [
        "run",
        "status",
        "model",
        "params",
        "trainable",
        "img_size",
        "epochs",
        "wall_s",
        "img_per_s",
        "cv",
        "folds",
        "tta_views",
        "public",
        "private",
        "differs",
    ]
    for col in shown:
        table.add_column(col, overflow="fold")
    for _, row in df.iterrows():
        folds = (
            "-"
            if math.isnan(row["fold_mean"])
            else (
                f"{row['fold_mean']:.4f}"
                + ("" if math.isnan(row["fold_std"]) else f" ± {row['fold_std']:.4f}")
            )
        )
        cells = [folds if c == "folds" else _fmt(c, row[c]) for c in shown]
        table.add_row(*[escape(x) for x in cells])
    return table
