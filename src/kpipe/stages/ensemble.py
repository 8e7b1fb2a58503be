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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy.optimize import minimize
from scipy.special import logsumexp

from kpipe.eval import metrics
from kpipe.config import Config
from kpipe.errors import KpipeError, preview
from kpipe.io import read_csv_ids, write_json
from kpipe.nn.tta import aggregate

EPS = 1e-15  # same clipping as metrics.score's log loss
ZERO_WEIGHT = 1e-6  # optimiser dust below this is set to exactly 0


# ------------------------------------------------------------------ pure core


def blend(probs_list: list[np.ndarray], weights: np.ndarray, how: str = "mean") -> np.ndarray:
    """Weighted mean (or renormalised weighted geometric mean) of (N, K) probability arrays."""
    return aggregate(np.stack(probs_list), how, np.asarray(weights, dtype=np.float64), eps=EPS)


def _log_loss_and_grad(
    w: np.ndarray, probs: np.ndarray, labels: np.ndarray, how: str
) -> tuple[float, np.ndarray]:
    """Log loss of the blend with weights w, and its gradient in w. probs: (M, N, K)."""
    rows = np.arange(probs.shape[1])
    if how == "mean":
        q = probs[:, rows, labels].T  # (N, M): each member's probability of the true class
        qw = np.maximum(q @ w, EPS)
        return float(-np.log(qw).mean()), -(q / qw[:, None]).mean(axis=0)
    logp = np.log(np.clip(probs, EPS, 1.0))  # (M, N, K)
    s = np.einsum("m,mnk->nk", w, logp)
    log_z = logsumexp(s, axis=1)
    soft = np.exp(s - log_z[:, None])
    loss = -(s[rows, labels] - log_z).mean()
    grad = -(logp[:, rows, labels] - np.einsum("nk,mnk->mn", soft, logp)).mean(axis=1)
    return float(loss), grad


def _clean(w: np.ndarray) -> np.ndarray:
    w = np.clip(np.asarray(w, dtype=np.float64), 0.0, None)
    w[w < ZERO_WEIGHT] = 0.0
    return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))


def fit_log_loss(probs: np.ndarray, labels: np.ndarray, how: str = "mean") -> np.ndarray:
    """Weights (>= 0, sum 1) minimising the blend's log loss; probs (M, N, K)."""
    m = probs.shape[0]
    if m == 1:
        return np.ones(1)
    res = minimize(
        _log_loss_and_grad,
        np.full(m, 1.0 / m),
        args=(probs, labels, how),
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * m,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        options={"maxiter": 200, "ftol": 1e-10},
    )
    # A failed run still returns its best point; the candidates below guard against a poor one.
    return _clean(res.x)


def _coordinate_ascent(
    probs: np.ndarray, labels: np.ndarray, metric: str, how: str, w0: np.ndarray, rounds: int = 5
) -> np.ndarray:
    """Greedy search on an argmax metric: move one member's share over a grid, others rescaled."""
    # Accuracy and F1 only see the argmax, which a geometric blend shares with its log-space sum.
    base = probs if how == "mean" else np.log(np.clip(probs, EPS, 1.0))
    better = 1.0 if metrics.higher_is_better(metric) else -1.0
    w = w0.copy()
    best = metrics.score_preds(metric, labels, np.einsum("m,mnk->nk", w, base).argmax(1))
    grid = np.linspace(0.0, 1.0, 21)
    for _ in range(rounds):
        improved = False
        for i in range(len(w)):
            rest = np.delete(w, i)
            rest = rest / rest.sum() if rest.sum() > 0 else np.full(len(rest), 1.0 / len(rest))
            others = np.einsum("m,mnk->nk", rest, np.delete(base, i, axis=0))
            for g in grid:
                s = metrics.score_preds(metric, labels, (g * base[i] + (1 - g) * others).argmax(1))
                if better * (s - best) > 1e-12:
                    best, improved = s, True
                    w = np.insert((1 - g) * rest, i, g)
        if not improved:
            break
    return _clean(w)


@dataclass(frozen=True)
class Fit:
    weights: np.ndarray
    method: str  # which candidate won: "log-loss fit", "equal", "single", "coordinate ascent"
    cv: float  # the metric of the blended OOF with these weights
    log_loss: float


def fit(oof_probs: list[np.ndarray], labels: np.ndarray, metric: str, how: str = "mean") -> Fit:
    """Fit blend weights on OOF and say which candidate won; see the module docstring."""
    probs = np.stack([np.asarray(p, dtype=np.float64) for p in oof_probs])
    labels = np.asarray(labels, dtype=np.int64)
    m = probs.shape[0]
    candidates: list[tuple[str, np.ndarray]] = [("log-loss fit", fit_log_loss(probs, labels, how))]
    if m > 1:
        candidates.append(("equal", np.full(m, 1.0 / m)))
        candidates.extend(("single", np.eye(m)[i]) for i in range(m))

    def judge(name: str, w: np.ndarray) -> Fit:
        p = blend(list(probs), w, how)
        return Fit(w, name, metrics.score(metric, labels, p), metrics.score("log_loss", labels, p))

    fits = [judge(name, w) for name, w in candidates]
    sign = 1.0 if metrics.higher_is_better(metric) else -1.0
    best = max(fits, key=lambda f: (sign * f.cv, -f.log_loss))
    if metric != "log_loss" and m > 1:
        ca = judge("coordinate ascent", _coordinate_ascent(probs, labels, metric, how, best.weights))
        if sign * (ca.cv - best.cv) > 1e-12:
            best = ca
    return best


def fit_weights(
    oof_probs: list[np.ndarray], labels: np.ndarray, metric: str, how: str = "mean"
) -> np.ndarray:
    """Non-negative weights summing to 1 that blend the members' OOF best by `metric`."""
    return fit(oof_probs, labels, metric, how).weights


# ------------------------------------------------------------------ reading runs


@dataclass(frozen=True)
class Oof:
    ids: list[str]
    labels: list[str]
    classes: list[str]
    probs: np.ndarray  # (N, K) in `classes` order


def read_oof(path: Path) -> Oof:
    """One OOF file: id, fold, label, p_<class>... (all ids kept as text)."""
    if not path.is_file():
        raise KpipeError(f"{path}: not found. Train the run (kpipe train) or drop it from the ensemble.")
    df = read_csv_ids(path)
    pcols = [c for c in df.columns if c.startswith("p_")]
    missing = [c for c in ("id", "label") if c not in df.columns]
    if missing or not pcols:
        raise KpipeError(f"{path}: expected columns id, fold, label, p_<class>...; got {list(df.columns)}.")
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise KpipeError(f"{path}: ids appear more than once: {preview(dup.tolist())}.")
    probs = df[pcols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise KpipeError(
            f"{path}: non-numeric or empty probabilities in rows {preview(df['id'][bad].tolist())}."
        )
    return Oof(df["id"].tolist(), df["label"].tolist(), [c[2:] for c in pcols], probs)


def _align(ref: Oof, other: Oof, where: str) -> np.ndarray:
    """other's probabilities in ref's row and class order; errors say what differs."""
    if set(other.classes) != set(ref.classes):
        raise KpipeError(
            f"{where}: classes differ from the first member's: only here {preview(sorted(set(other.classes) - set(ref.classes)))}, "
            f"missing here {preview(sorted(set(ref.classes) - set(other.classes)))}. Ensemble runs of the same competition and classes."
        )
    if set(other.ids) != set(ref.ids):
        extra, missing = sorted(set(other.ids) - set(ref.ids)), sorted(set(ref.ids) - set(other.ids))
        raise KpipeError(
            f"{where}: OOF ids differ from the first member's ({len(missing)} missing: {preview(missing)}; "
            f"{len(extra)} extra: {preview(extra)}). Members must be trained on the same folds file and folds."
        )
    pos = pd.Series(range(len(other.ids)), index=other.ids)[ref.ids].to_numpy()
    labels = np.asarray(other.labels, dtype=object)[pos]
    diff = [i for i, a, b in zip(ref.ids, ref.labels, labels, strict=True) if a != b]
    if diff:
        raise KpipeError(
            f"{where}: labels differ from the first member's for ids {preview(diff)}. "
            "Members must be trained on the same labels (re-train after a relabel)."
        )
    cols = [other.classes.index(c) for c in ref.classes]
    return other.probs[pos][:, cols]


@dataclass(frozen=True)
class Member:
    run: str
    view: str
    probs: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.run} [{self.view}]"


def load_members(run_dirs: list[str], include_tta: bool) -> tuple[Oof, list[Member]]:
    """Every member's OOF aligned to the first run's oof.csv: (reference, members)."""
    ref: Oof | None = None
    members: list[Member] = []
    for run in run_dirs:
        files = {"identity": Path(run) / "oof.csv"}
        if include_tta:
            # oof_tta/identity.csv, when present, replaces oof.csv: same code path as test inference.
            files.update({p.stem: p for p in sorted((Path(run) / "oof_tta").glob("*.csv"))})
        for view, path in files.items():
            oof = read_oof(path)
            if ref is None:
                ref = oof
            members.append(Member(str(run), view, _align(ref, oof, str(path))))
    if ref is None:
        raise KpipeError("no runs to ensemble: pass run folders, e.g. kpipe ensemble runs/a runs/b.")
    unknown = sorted(set(ref.labels) - set(ref.classes))
    if unknown:
        raise KpipeError(f"{run_dirs[0]}/oof.csv: labels with no p_<class> column: {preview(unknown)}.")
    return ref, members


# ------------------------------------------------------------------ stage


def run(
    cfg: Config, run_dirs: list[str] | None = None, out: Path | None = None, include_tta: bool = False
) -> dict[str, Any]:
    """Fit weights over run folders (default: infer.runs, else this experiment's run) and write them as JSON
    to `out` (default: infer.ensemble_weights, else runs/ensembles/<exp>.json)."""
    run_dirs = list(run_dirs or cfg.infer.runs or [str(cfg.run_dir)])
    out = Path(
        out or cfg.infer.ensemble_weights or Path(cfg.paths.runs_dir) / "ensembles" / f"{cfg.name}.json"
    )
    metric, how = cfg.competition.metric, cfg.infer.agg
    ref, members = load_members(run_dirs, include_tta)
    index = {c: i for i, c in enumerate(ref.classes)}
    labels = np.array([index[label] for label in ref.labels])
    result = fit([mb.probs for mb in members], labels, metric, how)
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
    Console().print(f"weights written to {out}")
    return report


def _print_table(report: dict[str, Any]) -> None:
    table = Table(title=f"OOF {report['metric']} ({report['n_rows']} rows, {report['how']} blend)")
    for col in ("member", "view", "weight", "cv"):
        table.add_column(col, justify="left" if col in ("member", "view") else "right")
    for mb in report["members"]:
        table.add_row(mb["run"], mb["view"], f"{mb['weight']:.3f}", f"{mb['cv']:.5f}")
    table.add_section()
    table.add_row("equal weights", "", "", f"{report['cv_equal']:.5f}")
    table.add_row(f"blend ({report['method']})", "", "1.000", f"{report['cv_blend']:.5f}", style="bold")
    Console().print(table)
