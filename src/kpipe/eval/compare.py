"""Pictures of several runs side by side: CV with its fold spread, time, curves, per-class F1 vs a baseline.

Everything is drawn from `runs_table.RunRecord`s (what the runs wrote) and per-class F1 tables
(`metrics.per_class_report` over each run's OOF); `write_report` puts the PNGs and an index.html
that shows them, with the config keys that differ, in one folder.
Usage: ``write_report(out_dir, records, f1_by_run, baseline="r18")``
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kpipe.eval.runs_table import RunRecord, differing_keys  # noqa: E402
from kpipe.io import atomic_path, write_text  # noqa: E402

MAX_CLASSES = 40  # per-class charts show the classes that changed most, worst first


def _save(fig: plt.Figure, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _fold_scores(rec: RunRecord) -> list[float]:
    return [float(v) for v in (rec.cv or {}).get("per_fold", {}).values()]


def plot_cv(records: list[RunRecord], path: Path) -> str:
    """CV bar per run, the folds as dots and their standard deviation as the error bar."""
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(records) + 2), 4))
    x = np.arange(len(records))
    cv = [float((r.cv or {}).get("cv", math.nan)) for r in records]
    std = [float(np.std(s)) if len(s := _fold_scores(r)) > 1 else 0.0 for r in records]
    ax.bar(x, cv, yerr=std, capsize=4, color="tab:blue", alpha=0.7)
    for i, r in enumerate(records):
        folds = _fold_scores(r)
        ax.scatter([i] * len(folds), folds, color="black", s=12, zorder=3)
    finite = [
        v for r in records for v in [*_fold_scores(r), (r.cv or {}).get("cv", math.nan)] if np.isfinite(v)
    ]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max((hi - lo) * 0.3, 0.01)
        ax.set_ylim(lo - pad, hi + pad)
    metric = next((r.cv["metric"] for r in records if r.cv and "metric" in r.cv), "score")
    ax.set_xticks(x, [r.name for r in records], rotation=30, ha="right")
    ax.set_ylabel(f"CV {metric}")
    ax.set_title("CV (bars), folds (dots), fold std (error bars)")
    return _save(fig, path)


def run_seconds(rec: RunRecord) -> tuple[float, str]:
    """Wall time from run.json, else the training epochs' seconds from metrics.csv (which omit validation)."""
    walls = rec.facts.get("fold_wall_s")
    if walls:
        return float(sum(walls.values())), "wall"
    secs = [
        pd.to_numeric(m["seconds"], errors="coerce").sum() for m in rec.metrics.values() if "seconds" in m
    ]
    return (float(sum(secs)), "train epochs") if secs else (math.nan, "")


def plot_time(records: list[RunRecord], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(records) + 2), 4))
    times = [run_seconds(r) for r in records]
    x = np.arange(len(records))
    ax.bar(
        x, [t / 60 for t, _ in times], color=["tab:orange" if k == "wall" else "tab:gray" for _, k in times]
    )
    ax.set_xticks(x, [r.name for r in records], rotation=30, ha="right")
    ax.set_ylabel("minutes")
    ax.set_title("training time (orange: wall time; gray: training epochs only)")
    return _save(fig, path)


def mean_curve(rec: RunRecord, column: str) -> pd.Series:
    """`column` of metrics.csv by epoch, averaged over the folds that reached that epoch."""
    parts = [
        m.set_index("epoch")[column].astype(float)
        for m in rec.metrics.values()
        if {"epoch", column} <= set(m.columns)
    ]
    return pd.concat(parts, axis=1).mean(axis=1).sort_index() if parts else pd.Series(dtype=float)


def plot_curves(records: list[RunRecord], path: Path) -> str:
    """Validation score and loss per epoch, every run overlaid (mean over its folds)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for column, ax in zip(("val_score", "val_loss"), axes, strict=True):
        for r in records:
            curve = mean_curve(r, column)
            if len(curve):
                ax.plot(curve.index, curve.to_numpy(), marker="o", label=r.name)
        ax.set_xlabel("epoch")
        ax.set_title(f"{column} (mean over folds)")
    axes[0].legend(fontsize="small")
    return _save(fig, path)


def f1_delta(f1: pd.DataFrame, base: pd.DataFrame) -> pd.Series:
    """Per-class F1 of a run minus the baseline's, by class, worst first."""
    merged = f1.set_index("class")["f1"].sub(base.set_index("class")["f1"], fill_value=0.0)
    return merged.sort_values(kind="stable")


def plot_f1_delta(f1_by_run: dict[str, pd.DataFrame], baseline: str, path: Path) -> str:
    others = [n for n in f1_by_run if n != baseline]
    fig, axes = plt.subplots(1, max(len(others), 1), figsize=(5 * max(len(others), 1), 5), squeeze=False)
    for ax, name in zip(axes[0], others, strict=False):
        delta = f1_delta(f1_by_run[name], f1_by_run[baseline])
        if len(delta) > MAX_CLASSES:  # the classes that moved most, still worst first
            delta = delta.loc[delta.abs().nlargest(MAX_CLASSES).index].sort_values(kind="stable")
        ax.barh(
            np.arange(len(delta)),
            delta.to_numpy(),
            color=["tab:red" if v < 0 else "tab:green" for v in delta.to_numpy()],
        )
        ax.set_yticks(np.arange(len(delta)), [str(c) for c in delta.index], fontsize="small")
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"{name} - {baseline}: per-class F1")
    if not others:
        axes[0][0].set_title("only the baseline has OOF predictions")
    return _save(fig, path)


def write_report(
    out: Path, records: list[RunRecord], f1_by_run: dict[str, pd.DataFrame], baseline: str
) -> Path:
    """PNGs and index.html in `out`; returns the index."""
    out.mkdir(parents=True, exist_ok=True)
    images = [
        plot_cv(records, out / "cv.png"),
        plot_time(records, out / "time.png"),
        plot_curves(records, out / "curves.png"),
    ]
    if baseline in f1_by_run:
        images.append(plot_f1_delta(f1_by_run, baseline, out / "f1_delta.png"))
    keys = differing_keys({r.name: r.config for r in records})
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in records)
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td>"
        + "".join(f"<td>{html.escape(str(r.config.get(k, '-')))}</td>" for r in records)
        + "</tr>"
        for k in keys
    )
    body = "".join(f'<p><img src="{html.escape(name)}" alt="{html.escape(name)}"></p>' for name in images)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>kpipe compare</title>"
        "<style>body{font-family:sans-serif;margin:2em} td,th{border:1px solid #ccc;padding:4px 8px}"
        "table{border-collapse:collapse}</style></head><body>"
        f"<h1>{html.escape(', '.join(r.name for r in records))}</h1>"
        f"<p>baseline: {html.escape(baseline)}</p>"
        f"<h2>config keys that differ</h2><table><tr><th>key</th>{head}</tr>{rows}</table>{body}</body></html>"
    )
    write_text(out / "index.html", page)
    return out / "index.html"
