"""Run reports from files: learning curves, OOF confusion matrix, per-class precision/recall/F1.

Reads runs/<exp>/fold<k>/metrics.csv and the OOF table; writes curves.png, confusion.png,
per_class.csv and per_class.png, and prints the per-class table.
Usage: ``reports.write_all(Path("runs/demo"), oof, classes)``
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from rich.table import Table  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from kpipe.console import console, safe  # noqa: E402
from kpipe.eval.metrics import per_class_report  # noqa: E402
from kpipe.io import atomic_path, write_csv  # noqa: E402
from kpipe.paths import RunDir  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_curves(run_dir: Path) -> None:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for fold_dir in RunDir(run_dir).fold_dirs():
        if not fold_dir.metrics.is_file():
            continue
        m = pd.read_csv(fold_dir.metrics)
        fold = fold_dir.root.name
        ax_loss.plot(m["epoch"], m["train_loss"], "--", label=f"{fold} train")
        ax_loss.plot(m["epoch"], m["val_loss"], label=f"{fold} val")
        ax_acc.plot(m["epoch"], m["val_accuracy"], label=f"{fold} accuracy")
        ax_acc.plot(m["epoch"], m["val_macro_f1"], ":", label=f"{fold} macro-F1")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="score", title="validation")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, RunDir(run_dir).curves_png)


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    n = len(classes)
    size = min(max(4.0, n * 0.35), 30.0)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(n)
    show = n <= 60  # beyond that, labels would be unreadable anyway
    ax.set_xticks(ticks if show else [])
    ax.set_yticks(ticks if show else [])
    if show:
        ax.set_xticklabels(classes, rotation=90, fontsize=7)
        ax.set_yticklabels(classes, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set(xlabel="predicted", ylabel="given label", title="OOF confusion (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def plot_per_class(report: pd.DataFrame, path: Path) -> None:
    n = len(report)
    fig, ax = plt.subplots(figsize=(max(6, n * 0.3), 4))
    x = np.arange(n)
    for off, col in zip((-0.27, 0, 0.27), ("precision", "recall", "f1"), strict=True):
        ax.bar(x + off, report[col], width=0.27, label=col)
    ax.set_xticks(x)
    ax.set_xticklabels(report["class"], rotation=90, fontsize=7)
    ax.set(ylim=(0, 1.05), title="per-class OOF scores")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_all(run_dir: Path, oof: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    labels = oof["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    preds = oof[[f"p_{c}" for c in classes]].to_numpy().argmax(axis=1)
    plot_curves(run_dir)
    plot_confusion(
        confusion_matrix(labels, preds, labels=range(len(classes))), classes, RunDir(run_dir).confusion_png
    )
    report = per_class_report(labels, preds, classes)
    write_csv(RunDir(run_dir).per_class_csv, report)
    plot_per_class(report, RunDir(run_dir).per_class_png)
    table = Table(title="per-class OOF scores (worst F1 first)")
    for col in report.columns:
        table.add_column(col, justify="left" if col == "class" else "right")
    for _, r in report.sort_values("f1").head(30).iterrows():
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else safe(v) for v in r.tolist()])
    console.print(table)
    return report
