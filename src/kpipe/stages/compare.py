"""`kpipe compare RUN... [--baseline RUN]`: one HTML report with pictures of several runs side by side.

Reads each run folder (config.yaml, cv.json, fold<k>/metrics.csv, run.json, oof.csv) and writes
runs/compare/<name>/index.html with cv.png, time.png, curves.png and f1_delta.png (each run's
per-class F1 minus the baseline's, from their OOF predictions).
Usage: ``kpipe compare r18 r34 r50 --baseline r18``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kpipe import paths
from kpipe.console import console, safe
from kpipe.errors import KpipeError
from kpipe.eval import compare, runs_table
from kpipe.eval.metrics import per_class_report
from kpipe.eval.oof import read_oof


def resolve(runs_dir: str | Path, run: str) -> paths.RunDir:
    """A run given by folder name under runs_dir, or by path."""
    for candidate in (Path(runs_dir) / run, Path(run)):
        if (candidate / "config.yaml").is_file():
            return paths.RunDir(candidate)
    raise KpipeError(
        f"{run}: not a run folder (no config.yaml in {Path(runs_dir) / run} or {run}). "
        "`kpipe runs` lists the runs."
    )


def per_class_f1(run: paths.RunDir) -> pd.DataFrame:
    oof = read_oof(run.oof)
    return per_class_report(oof.y, np.argmax(oof.probs, axis=1), oof.classes)


def run(runs_dir: str | Path, runs: list[str], baseline: str | None = None, name: str | None = None) -> Path:
    if len(runs) < 1:
        raise KpipeError("compare: name at least one run (two or more to compare).")
    dirs = [resolve(runs_dir, r) for r in runs]
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        raise KpipeError(f"compare: a run is named twice ({', '.join(names)}).")
    base = baseline if baseline is not None else names[0]
    if baseline is not None and baseline not in names:
        dirs.insert(0, resolve(runs_dir, baseline))
        base = dirs[0].name
    records = [runs_table.load_run(d) for d in dirs]
    f1 = {d.name: per_class_f1(d) for d in dirs if d.oof.is_file()}
    missing = [d.name for d in dirs if not d.oof.is_file()]
    if missing:
        console.print(
            f"[yellow]no oof.csv yet in {safe(', '.join(missing))}: left out of the per-class F1 chart."
        )
    out = paths.compare_dir(runs_dir, name or "__".join(names)[:120])
    index = compare.write_report(out, records, f1, base)
    console.print(f"wrote {safe(index)}")
    return index
