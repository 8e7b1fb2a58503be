"""Which runs, folds and TTA views `kpipe infer` predicts, and how it combines them: the plan.

From infer.runs + infer.tta + infer.agg, or from the JSON `kpipe ensemble` wrote (infer.ensemble_weights).
`kpipe infer` follows it; `kpipe package` copies exactly the runs and views it names, so the package
holds what infer needs and nothing else. `class_prior` is the guess for an unreadable test image.
Usage: ``plan = make_plan(cfg, None, classes); plan.runs, plan.views[plan.runs[0]]``
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kpipe import paths
from kpipe.config import Config
from kpipe.errors import KpipeError, preview
from kpipe.nn import tta


@dataclass(frozen=True)
class Plan:
    runs: list[str]
    views: dict[str, list[str]]  # run -> views to predict
    weights: dict[tuple[str, str], float] | None  # (run, view) -> weight, from `kpipe ensemble`
    how: str
    cv: float | None  # the ensemble's OOF CV, when weights are used


def class_prior(labels: list[str], classes: list[str]) -> np.ndarray:
    """Class frequencies of the training labels, in `classes` order: the guess for an unreadable image."""
    counts = (
        pd.Series(labels, dtype=object).value_counts().reindex(classes, fill_value=0).to_numpy(np.float64)
    )
    if counts.sum() == 0:
        return np.full(len(classes), 1.0 / len(classes))
    return counts / counts.sum()


def resolve_runs(cfg: Config, runs: list[str] | None) -> list[str]:
    return [str(r) for r in (runs or cfg.infer.runs or [paths.run_dir(cfg).root])]


def make_plan(cfg: Config, runs: list[str] | None, classes: list[str]) -> Plan:
    """Which runs and views to predict and how to combine them: infer.tta + infer.agg, or the ensemble JSON."""
    if cfg.infer.ensemble_weights is None:
        names = resolve_runs(cfg, runs)
        views = tta.parse_views(cfg.infer.tta)
        return Plan(names, {r: views for r in names}, None, cfg.infer.agg, None)
    path = Path(cfg.infer.ensemble_weights)
    if not path.is_file():
        raise KpipeError(f"infer.ensemble_weights: {path} not found. Write it with `kpipe ensemble` first.")
    rep = json.loads(path.read_text(encoding="utf-8"))
    if set(rep.get("classes", classes)) != set(classes):
        raise KpipeError(
            f"{path}: fitted on classes {preview(rep['classes'])}, not this competition's "
            f"{preview(classes)}. Re-run `kpipe ensemble`."
        )
    given = runs or cfg.infer.runs
    in_json = {Path(m["run"]).resolve() for m in rep["members"]}
    if given and {Path(r).resolve() for r in given} != in_json:
        raise KpipeError(
            f"{path} blends runs {preview(sorted(str(p) for p in in_json))}, but infer was given "
            f"{preview(list(given))}. Drop --runs / infer.runs, or re-run `kpipe ensemble` on these runs."
        )
    for m in rep["members"]:  # NaN > 0 is False: a NaN weight would silently drop its member
        if not math.isfinite(float(m["weight"])) or float(m["weight"]) < 0:
            raise KpipeError(
                f"{path}: member {m['run']} [{m['view']}] has weight {m['weight']}; weights must be "
                "finite and >= 0. Re-run `kpipe ensemble` to fit them again."
            )
    weights = {(m["run"], m["view"]): float(m["weight"]) for m in rep["members"] if float(m["weight"]) > 0}
    if not weights:
        raise KpipeError(f"{path}: every member has weight 0.")
    names = list(dict.fromkeys(r for r, _ in weights))
    views = {r: tta.parse_views([v for rr, v in weights if rr == r]) for r in names}
    return Plan(names, views, weights, rep.get("how", cfg.infer.agg), rep.get("cv_blend"))
