"""Blend weights on synthetic OOF, and the ensemble stage on run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kpipe.config import validate
from kpipe.errors import KpipeError
from kpipe.eval import blend as blend_lib
from kpipe.eval import metrics
from kpipe.eval import oof as oof_lib
from kpipe.stages import ensemble

CLASSES = ["cat", "dog", "eel"]


def _noisy(labels: np.ndarray, acc: float, rng: np.random.Generator, k: int = 3) -> np.ndarray:
    """Probabilities whose argmax is right about `acc` of the time."""
    p = rng.dirichlet(np.ones(k), size=len(labels))
    right = rng.random(len(labels)) < acc
    target = np.where(right, labels, (labels + 1) % k)
    p[np.arange(len(labels)), target] += 1.0
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("metric", metrics.names())
@pytest.mark.parametrize("how", ["mean", "geomean"])
def test_perfect_member_gets_the_weight(metric: str, how: str) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    perfect = np.full((300, 3), 0.05)
    perfect[np.arange(300), y] = 0.9
    members = [_noisy(y, 0.6, rng), perfect, _noisy(y, 0.5, rng)]
    w = blend_lib.fit_weights(members, y, metric, how)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    assert w[1] > 0.95


@pytest.mark.parametrize("metric", metrics.names())
def test_reported_cv_is_the_weighted_oof_and_beats_members(metric: str) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    members = [_noisy(y, a, rng) for a in (0.55, 0.6, 0.65)]
    fit = blend_lib.fit(members, y, metric)
    assert fit.cv == metrics.score(metric, y, blend_lib.blend(members, fit.weights))
    sign = 1 if metrics.higher_is_better(metric) else -1
    for cand in [*np.eye(3), np.full(3, 1 / 3)]:
        assert sign * fit.cv >= sign * metrics.score(metric, y, blend_lib.blend(members, cand)) - 1e-12


def test_log_loss_fit_is_optimal_on_a_grid() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    a, b = _noisy(y, 0.7, rng), _noisy(y, 0.6, rng)
    w = blend_lib.fit_log_loss(np.stack([a, b]), y)
    best = min(
        metrics.score("log_loss", y, blend_lib.blend([a, b], [g, 1 - g])) for g in np.linspace(0, 1, 101)
    )
    assert metrics.score("log_loss", y, blend_lib.blend([a, b], w)) <= best + 1e-9


def _write_oof(
    run: Path, ids: list[str], labels: list[str], probs: np.ndarray, classes: list[str], name: str = "oof.csv"
) -> None:
    df = pd.DataFrame({"id": ids, "fold": [i % 2 for i in range(len(ids))], "label": labels})
    for k, c in enumerate(classes):
        df[f"p_{c}"] = probs[:, k]
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(run / name, index=False)


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path, list[str], np.ndarray]:
    rng = np.random.default_rng(3)
    ids = [f"{i:03d}" for i in range(60)] + ["café 1", " spaced "]
    y = rng.integers(0, 3, len(ids))
    labels = [CLASSES[k] for k in y]
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    _write_oof(a, ids, labels, _noisy(y, 0.6, rng), CLASSES)
    _write_oof(a, ids, labels, _noisy(y, 0.7, rng), CLASSES, "oof_tta/hflip.csv")
    # run b: rows shuffled and class columns in another order; alignment must undo both
    order = rng.permutation(len(ids))
    pb = _noisy(y, 0.8, rng)
    _write_oof(
        b,
        [ids[i] for i in order],
        [labels[i] for i in order],
        pb[order][:, [2, 0, 1]],
        [CLASSES[i] for i in (2, 0, 1)],
    )
    return a, b, ids, pb


def _cfg(tmp_path: Path, metric: str = "accuracy"):
    return validate(
        {
            "name": "e",
            "competition": {"name": "c", "metric": metric},
            "paths": {"runs_dir": str(tmp_path / "runs")},
        }
    )


def test_run_aligns_writes_json_and_recomputes_cv(tmp_path: Path, runs) -> None:
    a, b, ids, pb = runs
    out = tmp_path / "w.json"
    report = ensemble.run(_cfg(tmp_path), [str(a), str(b)], out, include_tta=True)
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(report))
    assert [(m["run"], m["view"]) for m in saved["members"]] == [
        (str(a), "identity"),
        (str(a), "hflip"),
        (str(b), "identity"),
    ]
    assert sum(m["weight"] for m in saved["members"]) == pytest.approx(1.0)
    ref, members = oof_lib.load_members([str(a), str(b)], include_tta=True)
    np.testing.assert_allclose(members[2].probs, pb)  # b realigned to a's rows and class order
    y = np.array([CLASSES.index(lbl) for lbl in ref.labels])
    w = np.array([m["weight"] for m in saved["members"]])
    assert saved["cv_in_sample"] == metrics.score(
        "accuracy", y, blend_lib.blend([m.probs for m in members], w)
    )
    assert saved["cv_in_sample"] >= max(m["cv"] for m in saved["members"])


def test_run_without_tta_uses_oof_only(tmp_path: Path, runs) -> None:
    a, b, _, _ = runs
    report = ensemble.run(
        _cfg(tmp_path, "log_loss"), [str(a), str(b)], tmp_path / "w.json", include_tta=False
    )
    assert [m["view"] for m in report["members"]] == ["identity", "identity"]


def test_mismatched_ids_and_classes_fail_clearly(tmp_path: Path, runs) -> None:
    a, _, ids, _ = runs
    c, d = tmp_path / "runs" / "c", tmp_path / "runs" / "d"
    y = np.zeros(len(ids) - 1, dtype=int)
    _write_oof(c, ids[:-1], ["cat"] * (len(ids) - 1), np.eye(3)[y], CLASSES)
    with pytest.raises(KpipeError, match=r"1 missing: ' spaced '"):
        oof_lib.load_members([str(a), str(c)], include_tta=False)
    _write_oof(d, ids, ["cat"] * len(ids), np.eye(4)[np.zeros(len(ids), dtype=int)], [*CLASSES, "fox"])
    with pytest.raises(KpipeError, match="classes differ.*'fox'"):
        oof_lib.load_members([str(a), str(d)], include_tta=False)
    e = tmp_path / "runs" / "e"
    _write_oof(e, ids, ["cat"] * len(ids), np.full((len(ids), 3), 1 / 3), CLASSES)
    with pytest.raises(KpipeError, match="labels differ") as err:
        oof_lib.load_members([str(a), str(e)], include_tta=False)
    msg = str(err.value)  # names both runs' files and which label each was trained on
    assert str(a / "oof.csv") in msg and str(e / "oof.csv") in msg and "different label sets" in msg
    assert "'cat' here" in msg
    with pytest.raises(KpipeError, match="no out-of-fold predictions"):
        oof_lib.load_members([str(tmp_path / "nope")], include_tta=False)


# ------------------------------------------------------------------ honest blends: hill climbing, nested CV

# Three members, two classes, three folds of two rows. Member i is wrong (p_true 0.2) on the first row of
# fold i and right (p_true 0.9) everywhere else, so any two members outvote the third's mistake.
FOLDS = np.array([0, 0, 1, 1, 2, 2])
Y = np.array([0, 1, 0, 1, 0, 1])


def _fixed_members() -> list[np.ndarray]:
    out = []
    for i in range(3):
        p_true = np.full(6, 0.9)
        p_true[2 * i] = 0.2
        p = np.empty((6, 2))
        p[np.arange(6), Y] = p_true
        p[np.arange(6), 1 - Y] = 1 - p_true
        out.append(p)
    return out


def test_hill_climb_adds_members_by_gain() -> None:
    # In-sample: all three tie at 5/6; blending all three (equal counts) gets every row right.
    fit = blend_lib.hill_climb(_fixed_members(), Y, "accuracy")
    np.testing.assert_allclose(fit.weights, [1 / 3, 1 / 3, 1 / 3])
    assert fit.cv == 1.0


def test_nested_blend_cv_equals_the_hand_computation() -> None:
    members = _fixed_members()
    fit_fn = blend_lib.fitter("hill_climb", "accuracy", "mean")
    nested = blend_lib.nested(members, Y, FOLDS, "accuracy", "mean", fit_fn)
    # By hand: without fold f's rows, member f is the only one with no mistake (4/4, the others 3/4), and
    # adding any other member keeps 4/4 but raises the log loss, so the climb stops at member f alone.
    # Scored on fold f, member f gets its first row wrong and its second right: 1/2 on every fold.
    for f in range(3):
        np.testing.assert_allclose(nested.weights[f], np.eye(3)[f])
        assert nested.per_fold[f] == 0.5
    assert nested.cv == 0.5
    hand = np.concatenate([members[f][FOLDS == f] for f in range(3)])
    np.testing.assert_allclose(nested.probs, hand)


def _write_fixed(run: Path, probs: np.ndarray) -> None:
    ids = [f"r{i}" for i in range(6)]
    df = pd.DataFrame({"id": ids, "fold": FOLDS, "label": [["no", "yes"][k] for k in Y]})
    df["p_no"], df["p_yes"] = probs[:, 0], probs[:, 1]
    run.mkdir(parents=True, exist_ok=True)
    df.to_csv(run / "oof.csv", index=False)


@pytest.mark.parametrize("method", blend_lib.METHODS)
def test_stage_reports_nested_cv_beside_the_in_sample_one(
    tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [tmp_path / "runs" / f"m{i}" for i in range(3)]
    for run, probs in zip(runs, _fixed_members(), strict=True):
        _write_fixed(run, probs)
    rep = ensemble.run(_cfg(tmp_path), [str(r) for r in runs], tmp_path / "w.json", method=method)
    assert rep["method"] == method
    # a rank blend warns that an argmax metric reads rows, not ranked columns; the others do not
    assert ("rank_mean ranks each class column" in " ".join(capsys.readouterr().out.split())) == (
        method == "rank_mean"
    )
    if method == "hill_climb":
        assert rep["cv_in_sample"] == 1.0 and rep["cv_blend"] == 0.5
        assert rep["cv_blend_per_fold"] == {"0": 0.5, "1": 0.5, "2": 0.5}
    if method == "rank_mean":
        assert rep["how"] == "rank_mean" and all(m["weight"] == pytest.approx(1 / 3) for m in rep["members"])
    assert json.loads((tmp_path / "w.json").read_text())["cv_blend"] == rep["cv_blend"]


def test_rank_mean_blend_is_a_distribution_of_column_ranks() -> None:
    a = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    b = np.array([[0.5, 0.5], [0.7, 0.3], [0.1, 0.9]])
    out = blend_lib.blend([a, b], np.ones(2), blend_lib.RANK_MEAN)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    ranks = (np.array([[3, 1], [2, 2], [1, 3]]) + np.array([[2, 2], [3, 1], [1, 3]])) / 3 / 2
    np.testing.assert_allclose(out, ranks / ranks.sum(axis=1, keepdims=True))


def test_cli_methods_match_the_library() -> None:
    from kpipe.cli import ENSEMBLE_METHODS

    assert tuple(ENSEMBLE_METHODS) == blend_lib.METHODS


def test_unknown_method_and_single_fold_fail_clearly(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "one"
    _write_fixed(run, _fixed_members()[0])
    with pytest.raises(KpipeError, match="unknown method 'caruana'"):
        ensemble.run(_cfg(tmp_path), [str(run)], tmp_path / "w.json", method="caruana")
    with pytest.raises(KpipeError, match="at least 2 folds"):
        blend_lib.nested(
            _fixed_members(),
            Y,
            np.zeros(6),
            "accuracy",
            "mean",
            blend_lib.fitter("weights", "accuracy", "mean"),
        )


def test_blended_oof_for_relabel_from_runs_or_an_ensemble(tmp_path: Path, runs) -> None:
    a, b, _, _ = runs
    ref, members = oof_lib.load_members([str(a), str(b)], include_tta=True)
    oof = blend_lib.blended_oof([str(a), str(b)])  # every view of every run, equal weights
    np.testing.assert_allclose(oof.probs, np.mean([m.probs for m in members], axis=0))
    assert oof.ids == ref.ids and oof.labels == ref.labels and oof.folds is not None
    rep = ensemble.run(_cfg(tmp_path), [str(a), str(b)], tmp_path / "w.json", include_tta=True)
    from_json = blend_lib.blended_oof([str(tmp_path / "w.json")])  # the ensemble's own weights
    w = np.array([m["weight"] for m in rep["members"]])
    np.testing.assert_allclose(from_json.probs, blend_lib.blend([m.probs for m in members], w))
    ensemble.run(_cfg(tmp_path), [str(a), str(b)], tmp_path / "r.json", method="rank_mean")
    with pytest.raises(KpipeError, match="ranks, not probabilities"):
        blend_lib.blended_oof([str(tmp_path / "r.json")])
