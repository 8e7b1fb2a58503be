"""Blending members' probabilities, and fitting the blend weights on out-of-fold predictions.

Weights are non-negative and sum to 1. They are fitted on log loss first, which is smooth and,
for both the weighted arithmetic and geometric mean, convex in the weights, so SLSQP finds the
global optimum. For accuracy and macro-F1, that fit competes with equal weights, every single
member, and a coordinate ascent on the metric itself; the winner BY THE METRIC on OOF is kept
(ties go to the lower log loss). `hill_climb` is Caruana's ensemble selection: start from the best
member, add (with replacement) whichever member's addition gains most on OOF, stop when none gains;
the weights are the counts. `rank_mean` replaces each member's class columns by their ranks over the
rows (Kaggle's rank averaging) and averages them with equal weights: nothing is fitted.
Any figure fitted and scored on the same OOF is optimistic; `nested` refits on K-1 folds' OOF and
scores the held-out fold, fold by fold, which is the figure a blend can honestly report.
Usage: ``result = fit([oof_a, oof_b], labels, "accuracy"); test = blend([test_a, test_b], result.weights)``
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp
from scipy.stats import rankdata

from kpipe.errors import KpipeError
from kpipe.eval import metrics
from kpipe.eval.oof import Oof, load_members
from kpipe.nn.tta import aggregate

EPS = 1e-15  # same clipping as metrics.score's log loss


ZERO_WEIGHT = 1e-6  # optimiser dust below this is set to exactly 0
METHODS = ("weights", "hill_climb", "rank_mean")  # `kpipe ensemble --method`
RANK_MEAN = "rank_mean"  # the `how` of a rank-averaged blend (an ensemble JSON's "how")


def ranks(probs: np.ndarray) -> np.ndarray:
    """Each class column's ranks over the rows, scaled to (0, 1] (ties share their mean rank)."""
    p = np.asarray(probs, dtype=np.float64)
    return rankdata(p, axis=0) / len(p)


def blend(probs_list: list[np.ndarray], weights: np.ndarray, how: str = "mean") -> np.ndarray:
    """Weighted mean (or renormalised weighted geometric mean) of (N, K) probability arrays; with
    how="rank_mean", the weighted mean of their column ranks, each row renormalised to sum to 1."""
    w = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise KpipeError(
            f"blend weights must be finite, non-negative and not all 0; got {w.tolist()}. "
            "Re-run `kpipe ensemble` to fit them again."
        )
    if how == RANK_MEAN:
        out = aggregate(np.stack([ranks(p) for p in probs_list]), "mean", w)
        return out / out.sum(axis=1, keepdims=True)
    return aggregate(np.stack(probs_list), how, w, eps=EPS)


def check_finite(probs: np.ndarray, what: str) -> None:
    """KpipeError naming `what` (a run, a file) when its (N, K) probabilities hold NaN or inf."""
    bad = ~np.isfinite(np.asarray(probs, dtype=np.float64)).all(axis=-1)
    if bad.any():
        raise KpipeError(
            f"{what}: {int(bad.sum())} of {bad.size} rows have probabilities that are not finite "
            f"(NaN or inf), first at row {int(np.flatnonzero(bad)[0])}. The model that wrote them "
            "probably diverged: re-train it, or leave it out."
        )


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
    best = metrics.score(metric, labels, np.einsum("m,mnk->nk", w, base))
    grid = np.linspace(0.0, 1.0, 21)
    for _ in range(rounds):
        improved = False
        for i in range(len(w)):
            rest = np.delete(w, i)
            rest = rest / rest.sum() if rest.sum() > 0 else np.full(len(rest), 1.0 / len(rest))
            others = np.einsum("m,mnk->nk", rest, np.delete(base, i, axis=0))
            for g in grid:
                s = metrics.score(metric, labels, g * base[i] + (1 - g) * others)
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


def fit(
    oof_probs: list[np.ndarray],
    labels: np.ndarray,
    metric: str,
    how: str = "mean",
    names: list[str] | None = None,
) -> Fit:
    """Fit blend weights on OOF and say which candidate won; see the module docstring.
    `names` (one per member) name a member whose OOF holds NaN or inf in the KpipeError."""
    for i, p in enumerate(oof_probs):
        check_finite(p, names[i] if names else f"ensemble member {i}")
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


def hill_climb(
    oof_probs: list[np.ndarray], labels: np.ndarray, metric: str, how: str = "mean", max_steps: int = 100
) -> Fit:
    """Caruana's ensemble selection: from the best single member, add the member (with replacement)
    whose addition gains most by `metric` (then by log loss); stop when no addition gains."""
    probs = np.stack([np.asarray(p, dtype=np.float64) for p in oof_probs])
    labels = np.asarray(labels, dtype=np.int64)
    sign = 1.0 if metrics.higher_is_better(metric) else -1.0

    def key(counts: np.ndarray) -> tuple[float, float, float]:
        p = blend(list(probs), counts, how)
        s = metrics.score(metric, labels, p)
        ll = metrics.score("log_loss", labels, p)
        return sign * s, -ll, s

    counts = np.zeros(len(probs))
    counts[max(range(len(probs)), key=lambda i: key(np.eye(len(probs))[i])[:2])] = 1
    best = key(counts)
    for _ in range(max_steps):
        trials = [(key(counts + np.eye(len(probs))[i]), i) for i in range(len(probs))]
        top, i = max(trials, key=lambda t: t[0][:2])
        if top[:2] <= best[:2]:
            break
        counts[i] += 1
        best = top
    return Fit(counts / counts.sum(), "hill climb", best[2], -best[1])


def rank_mean(oof_probs: list[np.ndarray], labels: np.ndarray, metric: str) -> Fit:
    """Equal-weight rank averaging: nothing is fitted (its nested CV differs from the in-sample one only
    because the held-out fold's rows are ranked among themselves, as test rows are at inference)."""
    w = np.full(len(oof_probs), 1.0 / len(oof_probs))
    p = blend(oof_probs, w, RANK_MEAN)
    return Fit(w, "rank mean", metrics.score(metric, labels, p), metrics.score("log_loss", labels, p))


def fitter(method: str, metric: str, how: str) -> Callable[[list[np.ndarray], np.ndarray], Fit]:
    """The fitting function of `kpipe ensemble --method`: (members' OOF, labels) -> Fit."""
    if method == "weights":
        return lambda probs, labels: fit(probs, labels, metric, how)
    if method == "hill_climb":
        return lambda probs, labels: hill_climb(probs, labels, metric, how)
    if method == "rank_mean":
        return lambda probs, labels: rank_mean(probs, labels, metric)
    raise KpipeError(f"ensemble --method: unknown method '{method}'; use one of {', '.join(METHODS)}.")


@dataclass(frozen=True)
class Nested:
    cv: float  # the metric over every row, each blended with weights fitted without its fold
    per_fold: dict[int, float]  # fold -> the held-out fold's score
    weights: dict[int, np.ndarray]  # fold -> the weights fitted on the other folds
    probs: np.ndarray  # (N, K) the held-out blend of every row


def nested(
    oof_probs: list[np.ndarray],
    labels: np.ndarray,
    folds: np.ndarray,
    metric: str,
    how: str,
    fit_fn: Callable[[list[np.ndarray], np.ndarray], Fit],
) -> Nested:
    """Nested CV of a blend: for each fold f, fit on the rows of the other folds, blend fold f's rows
    with those weights; score all rows' held-out blend together, as a run's CV pools its OOF."""
    folds = np.asarray(folds)
    labels = np.asarray(labels, dtype=np.int64)
    uniq = [int(f) for f in np.unique(folds)]
    if len(uniq) < 2:
        raise KpipeError(
            f"nested blend CV needs OOF rows from at least 2 folds; the OOF has fold(s) {uniq}. "
            "Train more folds (train.folds) before ensembling."
        )
    out = np.zeros_like(np.asarray(oof_probs[0], dtype=np.float64))
    per_fold, weights = {}, {}
    for f in uniq:
        tr, te = folds != f, folds == f
        w = fit_fn([p[tr] for p in oof_probs], labels[tr]).weights
        # rank_mean ranks within the held-out rows, as it ranks within the test set at inference
        out[te] = blend([p[te] for p in oof_probs], w, how)
        per_fold[f], weights[f] = metrics.score(metric, labels[te], out[te]), w
    return Nested(metrics.score(metric, labels, out), per_fold, weights, out)


def blended_oof(sources: list[str], how: str = "mean") -> Oof:
    """One OOF table from several runs (every TTA view they have, equal weights) or from one ensemble JSON
    (its members and weights): the best evidence for ranking label suspects. Members must share labels."""
    if len(sources) == 1 and sources[0].endswith(".json"):
        path = Path(sources[0])
        if not path.is_file():
            raise KpipeError(f"{path}: ensemble JSON not found. Write it with `kpipe ensemble` first.")
        rep = json.loads(path.read_text(encoding="utf-8"))
        wanted = {(m["run"], m["view"]): float(m["weight"]) for m in rep["members"] if float(m["weight"]) > 0}
        ref, members = load_members(list(dict.fromkeys(r for r, _ in wanted)), include_tta=True)
        have = {(mb.run, mb.view): mb.probs for mb in members}
        missing = [f"{r} [{v}]" for r, v in wanted if (r, v) not in have]
        if missing:
            raise KpipeError(f"{path}: members {missing[:3]} have no OOF file now. Re-run `kpipe ensemble`.")
        probs, weights, how = [have[k] for k in wanted], np.array(list(wanted.values())), rep.get("how", how)
    else:
        ref, members = load_members(sources, include_tta=True)
        probs, weights = [mb.probs for mb in members], np.ones(len(members))
    if how == RANK_MEAN:
        raise KpipeError(
            "a rank_mean blend gives ranks, not probabilities, and confident learning reads "
            "probabilities: pass the runs themselves (kpipe relabel --from runs/a runs/b)."
        )
    return Oof(ref.ids, ref.labels, ref.classes, blend(probs, weights, how), ref.folds)
