"""`kpipe pseudo`: pseudo-labels for the test images from a run's or an ensemble's test predictions.

Reads what `kpipe infer` wrote (predictions/<name>/probs.csv, classes.json, unreadable.csv: infer a RUN with
`--runs runs/<exp>`, or an ENSEMBLE with `infer.ensemble_weights=runs/ensembles/<exp>.json`), keeps the rows
whose top probability reaches --threshold (unreadable images, which got the class prior, never), and
writes <work_dir>/pseudo/<name>.csv (kpipe.data.pseudo) with a .json saying where it came from.
A following `kpipe train data.pseudo=<that csv>` adds them to every fold's training rows; rounds repeat by
inferring with the new run and pseudo-labelling again.
Usage: ``kpipe pseudo -c EXP --comp C --from predictions/<name> --threshold 0.9 [--hard]``
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console
from kpipe.data import ingest
from kpipe.data.pseudo import select
from kpipe.errors import KpipeError, preview
from kpipe.eval.oof import PREFIX
from kpipe.io import read_csv_ids, write_csv, write_json


def run(
    cfg: Config, source: str, threshold: float = 0.9, hard: bool = False, out: str | None = None
) -> dict[str, Any]:
    """Write the pseudo-label CSV and its provenance JSON; return the provenance."""
    if not 0.0 <= threshold <= 1.0:
        raise KpipeError(f"pseudo --threshold {threshold}: a probability, between 0 and 1.")
    src = Path(source)
    probs_csv = src / "probs.csv"
    if not probs_csv.is_file():
        raise KpipeError(
            f"{src}: no probs.csv. Pass the predictions folder `kpipe infer` wrote (predictions/<name>): "
            "run `kpipe infer --runs <run>` or `kpipe infer infer.ensemble_weights=<json>` first."
        )
    classes = ingest.load_classes(cfg)
    saved = (
        json.loads((src / "classes.json").read_text(encoding="utf-8"))
        if (src / "classes.json").is_file()
        else None
    )
    if saved is not None and saved != classes:
        raise KpipeError(
            f"{src}/classes.json lists {preview(saved)}, this competition {preview(classes)}: "
            "infer again after `kpipe folds`."
        )
    probs = read_csv_ids(probs_csv)
    unreadable = (
        set(read_csv_ids(src / "unreadable.csv")["id"]) if (src / "unreadable.csv").is_file() else set()
    )
    probs = probs[~probs["id"].isin(unreadable)].reset_index(drop=True)
    cols = [f"{PREFIX}{c}" for c in classes]
    table = select(probs["id"].tolist(), probs[cols].to_numpy(float), classes, threshold, hard)
    path = Path(out) if out else paths.pseudo_csv(cfg, f"{src.name}_t{threshold:g}{'_hard' if hard else ''}")
    write_csv(path, table)
    info = {
        "source": str(src),
        "source_sha256": hashlib.sha256(probs_csv.read_bytes()).hexdigest(),
        "threshold": threshold,
        "hard": hard,
        "n_test": len(probs) + len(unreadable),
        "n_unreadable": len(unreadable),
        "n_kept": len(table),
        "per_class": table["label"].value_counts().reindex(classes, fill_value=0).to_dict(),
    }
    write_json(path.with_suffix(".json"), info)
    console.print(
        f"{len(table)} of {len(probs)} readable test images at confidence >= {threshold:g} -> {path}; "
        f"train with data.pseudo={path}"
    )
    return {**info, "file": str(path)}
