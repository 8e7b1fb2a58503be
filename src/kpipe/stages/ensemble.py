"""Blend weights for several runs (and their TTA views), fitted on out-of-fold predictions.

Each member is one run's OOF probabilities: ``oof.csv`` (the plain validation pass, i.e. the
``identity`` view) or, with TTA, ``oof_tta/<view>.csv`` written by `kpipe infer`'s OOF TTA.
Weights are non-negative and sum to 1. They are fitted on log loss first, which is smooth and,
for both the weighted arithmetic and geometric mean, convex in the weights, so SLSQP finds the
global optimum. For accuracy and macro-F1, that fit competes with equal weights, every single
member, and a coordinate ascent on the metric itself; the winner BY THE METRIC on OOF is kept
(ties go to the lower log loss). The CV reported is always recomputed from the chosen weights'
blended OOF, so it is exactly what those OOF rows show; note that picking among candidates on the
same OOF makes it slightly optimistic, as any OOF-tuned number is.
Usage: ``kpipe ensemble --runs runs/a runs/b``  ->  runs/ensembles/<exp>.json (infer.ensemble_weights)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console, safe
from kpipe.eval import metrics
from kpipe.eval.blend import blend, fit
from kpipe.eval.oof import load_members
from kpipe.io import write_json

# ------------------------------------------------------------------ pure core


















# ------------------------------------------------------------------ reading runs






# ------------------------------------------------------------------ stage


def run(
    cfg: Config, run_dirs: list[str] | None = None, out: Path | None = None, include_tta: bool = False
) -> dict[str, Any]:
    """Fit weights over run folders (default: infer.runs, else this experiment's run) and write them as JSON
    to `out` (default: infer.ensemble_weights, else runs/ensembles/<exp>.json)."""
    run_dirs = list(run_dirs or cfg.infer.runs or [str(paths.run_dir(cfg).root)])
    out = Path(out or cfg.infer.ensemble_weights or paths.ensemble_json(cfg))
    metric, how = cfg.competition.metric, cfg.infer.agg
    ref, members = load_members(run_dirs, include_tta)
    index = {c: i for i, c in enumerate(ref.classes)}
    labels = np.array([index[label] for label in ref.labels])
    result = fit([mb.probs for mb in members], labels, metric, how, names=[f"{mb.name} OOF" for mb in members])
    equal = metrics.score(metric, labels, blend([mb.probs for mb in members], np.ones(len(members)), how))
    report: dict[str, Any] = {
        "metric": metric,
        "how": how,
        "method": result.method,
        "cv_blend": result.cv,
        "cv_equal": equal,
        "log_loss_blend": result.log_loss,
        "n_rows": len(ref.ids),
        "classes": ref.classes,
        "members": [
            {
                "run": mb.run,
                "view": mb.view,
                "weight": float(w),
                "cv": metrics.score(metric, labels, mb.probs),
            }
            for mb, w in zip(members, result.weights, strict=True)
        ],
    }
    write_json(out, report)
    _print_table(report)
    console.print(f"weights written to {out}")
    return report


def _print_table(report: dict[str, Any]) -> None:
    table = Table(title=f"OOF {report['metric']} ({report['n_rows']} rows, {report['how']} blend)")
    for col in ("member", "view", "weight", "cv"):
        table.add_column(col, justify="left" if col in ("member", "view") else "right")
    for mb in report["members"]:
        table.add_row(safe(mb["run"]), safe(mb["view"]), f"{mb['weight']:.3f}", f"{mb['cv']:.5f}")
    table.add_section()
    table.add_row("equal weights", "", "", f"{report['cv_equal']:.5f}")
    table.add_row(f"blend ({report['method']})", "", "1.000", f"{report['cv_blend']:.5f}", style="bold")
    console.print(table)
