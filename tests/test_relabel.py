"""Relabel: confident learning on synthetic OOF, the decisions table, review page, apply, --quick."""

from __future__ import annotations

import base64
import hashlib
import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config, write_competition
from kpipe import cli, paths
from kpipe.config import Config
from kpipe.data import relabels
from kpipe.data.ingest import load_train
from kpipe.errors import KpipeError
from kpipe.eval import cleaning
from kpipe.io import read_csv_ids, write_csv
from kpipe.stages import folds, relabel

CLASSES4 = ["a", "b", "c", "d"]


def synthetic_oof(
    n: int = 600, k: int = 4, n_bad: int = 30, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, set[int]]:
    """(true, given, probs, planted rows): a model of mixed confidence; planted labels are confidently wrong."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), true] += rng.uniform(1.0, 5.0, n)  # easy and hard images, some the model gets wrong
    bad = rng.choice(n, n_bad, replace=False)
    logits[bad] = rng.normal(0, 1, (n_bad, k))
    logits[bad, true[bad]] += rng.uniform(3.0, 6.0, n_bad)  # the model is sure of the true class
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    given = true.copy()
    given[bad] = (true[bad] + rng.integers(1, k, n_bad)) % k
    return true, given, probs, set(bad.tolist())


def _truth(true: np.ndarray, given: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"i{j:04d}" for j in range(len(true))],
            "split": "train",
            "true_label": [CLASSES4[t] for t in true],
            "given_label": [CLASSES4[g] for g in given],
        }
    )


def _suspects(
    seed: int = 0, filter_by: str = "prune_by_noise_rate"
) -> tuple[pd.DataFrame, pd.DataFrame, set[str]]:
    true, given, probs, bad = synthetic_oof(seed=seed)
    truth = _truth(true, given)
    s = cleaning.find_suspects(
        truth["id"].tolist(), truth["given_label"].tolist(), probs, CLASSES4, filter_by
    )
    return s, truth, {f"i{j:04d}" for j in bad}


# ------------------------------------------------------------------ pure core


@pytest.mark.parametrize("filter_by", ["low_self_confidence", "prune_by_noise_rate"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_errors_found_and_ranked_top(seed: int, filter_by: str) -> None:
    s, truth, bad = _suspects(seed, filter_by)
    assert len(bad & set(s["id"])) / len(bad) >= 0.85  # cleanlab's list finds them ...
    top = set(s["id"].head(len(bad)))
    assert len(top & bad) / len(bad) >= 0.8  # ... and ranks them first
    assert s["score"].is_monotonic_decreasing and s["score"].between(0, 1).all()
    assert (s["suggested"] != s["given"]).all()
    planted = s[s["id"].isin(bad)]
    true = truth.set_index("id")["true_label"]
    assert (planted["suggested"] == planted["id"].map(true)).mean() >= 0.9
    table = relabels.accept_above_threshold(relabels.merge_relabels(None, s), 0.9)
    m = cleaning.relabel_precision_recall(table, truth)
    assert m["precision"] >= 0.8 and m["recall"] >= 0.8, m
    assert m["n_misfiled"] == len(bad) and m["fix_accuracy"] >= 0.9


def test_score_is_one_minus_given_probability() -> None:
    probs = np.array(
        [[0.9, 0.05, 0.05]] * 8 + [[0.05, 0.9, 0.05]] * 8 + [[0.05, 0.05, 0.9]] * 8 + [[0.02, 0.03, 0.95]]
    )
    labels = ["x"] * 8 + ["y"] * 8 + ["z"] * 8 + ["x"]
    s = cleaning.find_suspects([f"r{i}" for i in range(25)], labels, probs, ["x", "y", "z"])
    assert s["id"].tolist() == ["r24"]
    assert s.iloc[0]["score"] == pytest.approx(0.98) and s.iloc[0]["suggested"] == "z"


def test_low_self_confidence_flags_cleanlabs_count_lowest_given_probability_first() -> None:
    """The default filter: as many suspects as cleanlab's num_label_issues estimates, and exactly the
    rows with the lowest p(given label), whatever their class pair."""
    from cleanlab.count import num_label_issues

    true, given, probs, _ = synthetic_oof(seed=3)
    ids, labels = [f"i{j:04d}" for j in range(len(true))], [CLASSES4[g] for g in given]
    s = cleaning.find_suspects(ids, labels, probs, CLASSES4)
    n = num_label_issues(given, probs)
    assert len(s) == n
    p_given = probs[np.arange(len(given)), given]
    assert set(s["id"]) == {ids[j] for j in np.argsort(p_given)[:n]}
    other = cleaning.find_suspects(ids, labels, probs, CLASSES4, "prune_by_noise_rate")
    assert set(other["id"]) != set(s["id"])  # the filter really changes the pick


def test_unknown_filter_is_refused() -> None:
    with pytest.raises(KpipeError, match="unknown cleaning filter 'lowest'.*low_self_confidence"):
        cleaning.find_suspects(["a", "b"], ["x", "y"], np.eye(2), ["x", "y"], "lowest")


def test_unknown_oof_label_is_refused() -> None:
    with pytest.raises(KpipeError, match="no p_<class> column"):
        cleaning.find_suspects(["a"], ["q"], np.array([[1.0, 0.0]]), ["x", "y"])


def test_precision_recall_definitions() -> None:
    truth = pd.DataFrame(
        {
            "id": ["1", "2", "3", "4", "t"],
            "split": ["train"] * 4 + ["test"],
            "true_label": ["a", "b", "a", "a", "a"],
            "given_label": ["b", "a", "a", "a", ""],
        }
    )
    table = pd.DataFrame(
        {
            "id": ["1", "2", "3", "4"],
            "suggested": ["a", "c", "b", "b"],
            "decision": ["accept", "drop", "accept", "keep"],
        }
    )
    m = cleaning.relabel_precision_recall(table, truth)
    # acted on: 1 (hit, right fix), 2 (hit, dropped), 3 (label was right: a false alarm); 4 kept
    assert m == {
        "precision": 2 / 3,
        "recall": 1.0,
        "fix_accuracy": 1.0,
        "n_accepted": 2,
        "n_dropped": 1,
        "n_hits": 2,
        "n_misfiled": 2,
    }


def _table(rows: list[tuple]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=relabels.COLUMNS)
    return df.assign(score=pd.to_numeric(df["score"]))


def test_accept_above_accepts_exactly_the_undecided_rows_at_or_above() -> None:
    t = _table(
        [
            ("a", "x", "y", 0.99, "", "cleanlab"),
            ("b", "x", "y", 0.95, "keep", "cleanlab"),
            ("c", "x", "y", 0.9, "", "cleanlab"),
            ("d", "x", "y", 0.8999, "", "cleanlab"),
            ("e", "x", "y", np.nan, "", "manual"),
            ("f", "x", "y", 0.2, "drop", "cleanlab"),
        ]
    )
    out = relabels.accept_above_threshold(t, 0.9)
    assert out["decision"].tolist() == ["accept", "keep", "accept", "", "", "drop"]
    with pytest.raises(KpipeError, match=r"\[0, 1\]"):
        relabels.accept_above_threshold(t, 90)


def test_merge_keeps_decisions_and_manual_rows() -> None:
    existing = _table(
        [
            ("keepme", "x", "y", 0.5, "keep", "cleanlab"),
            ("acc", "x", "z", 0.7, "accept", "cleanlab"),
            ("undecided", "x", "y", 0.6, "", "cleanlab"),
            ("man", "y", "x", np.nan, "accept", "manual"),
            ("gone", "x", "y", 0.9, "drop", "cleanlab"),
        ]
    )
    fresh = pd.DataFrame(
        {
            "id": ["keepme", "acc", "new", "man"],
            "given": "x",
            "suggested": ["y", "y", "z", "z"],
            "score": [0.55, 0.75, 0.65, 0.99],
        }
    )
    out = relabels.merge_relabels(existing, fresh).set_index("id")
    assert set(out.index) == {"keepme", "acc", "new", "man", "gone"}  # 'undecided' no longer suspected
    assert out.loc["keepme", "decision"] == "keep" and out.loc["keepme", "score"] == 0.55
    assert out.loc["acc", "suggested"] == "z" and out.loc["acc", "score"] == 0.75  # the person's target stays
    assert (
        out.loc["man", "suggested"] == "x"
        and np.isnan(out.loc["man", "score"])
        and out.loc["man", "source"] == "manual"
    )
    assert out.loc["gone", "decision"] == "drop" and out.loc["new", "decision"] == ""
    assert list(out.index)[0] == "man"  # manual rows without a score first, then score descending


def test_normalise_names_the_bad_line() -> None:
    raw = pd.DataFrame(
        {
            "id": ["a", "b"],
            "given": "x",
            "suggested": "y",
            "score": ["0.5", ""],
            "decision": ["Accept ", "maybe"],
            "source": ["cleanlab", ""],
        }
    )
    with pytest.raises(KpipeError, match="line 3 .*'maybe'"):
        relabels.normalise_relabels(raw, "relabels.csv")
    ok = relabels.normalise_relabels(raw.assign(decision=["Accept ", ""]), "relabels.csv")
    assert ok["decision"].tolist() == ["accept", ""] and ok["source"].tolist() == ["cleanlab", "manual"]


def test_build_clean_labels_and_its_checks() -> None:
    labels = {"a": "x", "b": "x", "c": "y", "d": "y"}
    t = _table(
        [
            ("a", "x", "y", 0.9, "accept", "cleanlab"),
            ("b", "x", "y", 0.8, "drop", "cleanlab"),
            ("c", "y", "x", 0.7, "keep", "cleanlab"),
            ("d", "y", "x", 0.6, "", "cleanlab"),
        ]
    )
    clean = relabels.build_clean_labels(t, labels, ["x", "y"])
    assert clean.values.tolist() == [["a", "y", "relabel"], ["b", "x", "drop"]]
    manual_unknown_id = pd.concat(
        [t, _table([("zz", "x", "y", np.nan, "accept", "manual")])], ignore_index=True
    )
    with pytest.raises(KpipeError, match="line 6 .*'zz'.*not a usable training image id"):
        relabels.build_clean_labels(manual_unknown_id, labels, ["x", "y"])
    unknown_class = pd.concat([t, _table([("c", "y", "w", np.nan, "accept", "manual")])], ignore_index=True)
    with pytest.raises(KpipeError, match="line 6 .*class 'w'"):
        relabels.build_clean_labels(unknown_class, labels, ["x", "y"])
    clash = pd.concat([t, _table([("a", "x", "x", np.nan, "drop", "manual")])], ignore_index=True)
    with pytest.raises(KpipeError, match="line 6 .*contradicts line 2"):
        relabels.build_clean_labels(clash, labels, ["x", "y"])


def test_quick_config() -> None:
    base = {
        "name": "e",
        "competition": {"name": "c"},
        "model": {"name": "resnet50", "freeze_until": "layer4"},
        "train": {"epochs": 30, "folds": [0], "lr": 1e-4},
    }
    q = relabel.quick_config(relabel.validate({**base, "data": {"img_size": 32}}))
    assert (q.name, q.model.name, q.model.small_stem, q.model.pretrained, q.data.img_size) == (
        "e_quick",
        "resnet10t",
        True,
        False,
        32,
    )
    assert (
        q.train.epochs == relabel.QUICK_MAX_EPOCHS and q.train.folds is None and q.model.freeze_until is None
    )
    assert relabel.quick_config(relabel.validate({**base, "data": {"img_size": 384}})).data.img_size == 128
    big = relabel.quick_config(relabel.validate(base))
    assert big.data.img_size == 128 and not big.model.small_stem


# ------------------------------------------------------------------ the stage on real files

ODD_LABELS = ["cat dog", "émeu", "fox#1"]  # spaces, unicode and '#' in class names and ids


def _stage(tmp_path: Path, split: bool) -> tuple[Config, Path]:
    """A competition, its folds, and a planted OOF: one confidently misfiled image per class."""
    if split:  # raw files in their own folder, kpipe's under paths.data_root: proves the two are separate
        comp = write_competition(tmp_path / "raw", n_per_class=8, labels=ODD_LABELS)
        cfg = tiny_config(tmp_path, comp)
        assert paths.data_dir(cfg) != paths.work_dir(cfg)
    else:
        comp = write_competition(tmp_path, n_per_class=8, labels=ODD_LABELS)
        cfg = tiny_config(tmp_path, comp, ["competition.data_dir=null"])
        assert paths.data_dir(cfg) == paths.work_dir(cfg)
    folds.run(cfg)
    df = load_train(cfg).df
    classes = sorted(ODD_LABELS)
    probs = np.full((len(df), 3), 0.05)
    y = df["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs[np.arange(len(df)), y] = 0.9
    planted = df.groupby("label").head(1).index.to_numpy()
    probs[planted] = 0.02
    probs[planted, (y[planted] + 1) % 3] = 0.96
    oof = pd.DataFrame({"id": df["id"], "fold": 0, "label": df["label"]})
    oof[[f"p_{c}" for c in classes]] = probs
    write_csv(paths.run_dir(cfg).root / "oof.csv", oof)
    return cfg, comp


def _snapshot(folder: Path, skip: set[str] = frozenset()) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in skip
    }


KPIPE_OWN = {
    "relabels.csv",
    "relabels.csv.lock",
    "review.html",
    "labels_clean.csv",
    "labels_clean.source.json",
    "audit",
}


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"] or "")
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.mark.parametrize("split", [True, False], ids=["data_dir-elsewhere", "data_dir-default"])
def test_stage_writes_table_and_review_and_applies_idempotently(tmp_path: Path, split: bool) -> None:
    cfg, _ = _stage(tmp_path, split)
    before = _snapshot(paths.data_dir(cfg), KPIPE_OWN)
    table = relabel.run(cfg)
    planted = set(load_train(cfg).df.groupby("label").head(1)["id"])
    assert planted <= set(table["id"]) and set(table["id"].head(3)) == planted
    csv = read_csv_ids(paths.work_dir(cfg) / "relabels.csv")
    assert (
        list(csv.columns) == relabels.COLUMNS
        and (csv["decision"] == "").all()
        and (csv["source"] == "cleanlab").all()
    )

    page = paths.work_dir(cfg) / "review.html"
    links = _Links()
    links.feed(page.read_text(encoding="utf-8"))
    text = " ".join(links.text)
    assert all(i in text for i in csv["id"])  # every suspect listed
    assert len(links.srcs) >= len(csv)
    for src in links.srcs:
        head, data = src.split(",", 1)
        assert head in ("data:image/png;base64", "data:image/jpeg;base64") and base64.b64decode(data)
    files = [h for h in links.hrefs if not urlparse(h).scheme]
    assert len(files) > len(csv)
    for href in files:
        assert (page.parent / unquote(href)).is_file(), href

    relabel.run(cfg, accept_above=0.9, apply=True)
    clean_path = paths.clean_labels_csv(cfg)
    first = clean_path.read_bytes()
    clean = read_csv_ids(clean_path)
    assert set(clean["id"]) == planted and (clean["action"] == "relabel").all()
    relabel.run(cfg, apply=True)
    assert clean_path.read_bytes() == first  # applying twice = once
    assert _snapshot(paths.data_dir(cfg), KPIPE_OWN) == before  # the raw competition files are untouched
    if split:
        assert not any((paths.data_dir(cfg) / n).exists() for n in KPIPE_OWN)
    fresh = folds.run(cfg).set_index("id")["label"]
    assert all(fresh[i] == clean.set_index("id").loc[i, "label"] for i in planted)


def test_decisions_and_manual_rows_survive_rerun_and_apply(tmp_path: Path) -> None:
    cfg, _ = _stage(tmp_path, split=True)
    relabel.run(cfg)
    path = paths.work_dir(cfg) / "relabels.csv"
    t = read_csv_ids(path)
    t.loc[0, "decision"], t.loc[1, "decision"], t.loc[2, "decision"] = "keep", "drop", "accept"
    t["note"] = ["looks right to me", "", ""]  # a column of the person's own
    target = next(i for i in load_train(cfg).df["id"] if i not in set(t["id"]))
    manual = pd.DataFrame(
        [
            {
                "id": target,
                "given": target.split("_")[0],
                "suggested": "émeu",
                "score": "",
                "decision": "accept",
                "source": "manual",
            }
        ]
    )
    write_csv(path, pd.concat([t, manual], ignore_index=True))
    relabel.run(cfg)
    again = read_csv_ids(path).set_index("id")
    for i in range(3):
        assert again.loc[t.loc[i, "id"], "decision"] == t.loc[i, "decision"]
    assert again.loc[target, "source"] == "manual" and again.loc[target, "decision"] == "accept"
    assert again.loc[t.loc[0, "id"], "note"] == "looks right to me"
    relabel.run(cfg, apply=True)
    clean = read_csv_ids(paths.clean_labels_csv(cfg)).set_index("id")
    assert clean.loc[target, "label"] == "émeu" and clean.loc[t.loc[1, "id"], "action"] == "drop"
    assert t.loc[0, "id"] not in clean.index


def test_apply_refuses_a_bad_manual_row(tmp_path: Path) -> None:
    cfg, _ = _stage(tmp_path, split=True)
    relabel.run(cfg)
    path = paths.work_dir(cfg) / "relabels.csv"
    bad = pd.DataFrame(
        [
            {
                "id": "no such image",
                "given": "cat dog",
                "suggested": "émeu",
                "score": "",
                "decision": "accept",
                "source": "manual",
            }
        ]
    )
    write_csv(path, pd.concat([read_csv_ids(path), bad], ignore_index=True))
    with pytest.raises(KpipeError, match="'no such image'.*source manual.*not a usable training image id"):
        relabel.run(cfg, apply=True)
    assert not paths.clean_labels_csv(cfg).exists()


def test_manual_only_table_applies_without_a_run(tmp_path: Path) -> None:
    comp = write_competition(tmp_path / "raw", n_per_class=4, labels=ODD_LABELS)
    cfg = tiny_config(tmp_path, comp)
    with pytest.raises(KpipeError, match="--quick"):
        relabel.run(cfg)
    one = load_train(cfg).df["id"].iloc[0]
    write_csv(
        paths.work_dir(cfg) / "relabels.csv",
        pd.DataFrame(
            [
                {
                    "id": one,
                    "given": "",
                    "suggested": "fox#1",
                    "score": "",
                    "decision": "accept",
                    "source": "manual",
                }
            ]
        ),
    )
    relabel.run(cfg, apply=True)
    assert read_csv_ids(paths.clean_labels_csv(cfg)).values.tolist() == [[one, "fox#1", "relabel"]]
    assert (paths.work_dir(cfg) / "review.html").is_file()


@pytest.mark.slow
def test_quick_trains_a_small_model_then_suggests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    comp = write_competition(tmp_path, n_per_class=6)
    cfg = tiny_config(tmp_path, comp, ["train.epochs=1"])
    folds.run(cfg)
    monkeypatch.setattr(cli, "config_from", lambda args: cfg)
    assert cli.main(["relabel", "--quick"]) == 0
    quick_run = Path(cfg.paths.runs_dir) / f"{cfg.name}_quick"
    assert (quick_run / "oof.csv").is_file() and (paths.work_dir(cfg) / "relabels.csv").is_file()
    # Finished folds are reused, not retrained: a retrain would rewrite every checkpoint (oof.csv is
    # rewritten either way, so it tells nothing).
    checkpoints = sorted(quick_run.glob("fold*/*.pt"))
    assert checkpoints
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in checkpoints}
    assert cli.main(["relabel", "--quick"]) == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in checkpoints} == before
    assert cli.main(["relabel", "--quick", "--run", str(quick_run)]) == 2  # --quick trains its own run


def test_from_ranks_suspects_on_the_blended_oof(tmp_path: Path) -> None:
    cfg, _ = _stage(tmp_path, False)
    run = paths.run_dir(cfg).root
    oof = read_csv_ids(run / "oof.csv")
    pcols = [c for c in oof.columns if c.startswith("p_")]
    planted = set(load_train(cfg).df.groupby("label").head(1)["id"])
    other = (
        tmp_path / "runs" / "other"
    )  # a second model, sure of every given label: the planted rows look right
    calm = oof.copy()
    classes = [c[2:] for c in pcols]
    calm[pcols] = np.where(np.array(classes)[None, :] == calm["label"].to_numpy()[:, None], 0.9, 0.05)
    write_csv(other / "oof.csv", calm)
    single = relabel.run(cfg)
    (paths.work_dir(cfg) / "relabels.csv").unlink()
    both = relabel.run(cfg, sources=[str(run), str(other)])
    assert set(single["id"].head(3)) == planted
    assert set(both["id"]) < set(single["id"])  # the second model's evidence clears some suspects
    calm.loc[0, "label"] = next(c for c in classes if c != calm.loc[0, "label"])  # another label set: refused
    write_csv(other / "oof.csv", calm)
    with pytest.raises(KpipeError, match="different label sets"):
        relabel.run(cfg, sources=[str(run), str(other)])


def test_cli_filter_reaches_cleanlab_and_a_wrong_one_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, _ = _stage(tmp_path, False)
    monkeypatch.setattr(cli, "config_from", lambda args: cfg)
    seen: list[str] = []
    real = relabel.find_suspects

    def spy(*args: object) -> pd.DataFrame:
        seen.append(str(args[-1]))
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(relabel, "find_suspects", spy)
    assert cli.main(["relabel"]) == 0 and cli.main(["relabel", "--filter", "both"]) == 0
    assert seen == ["low_self_confidence", "both"]
    assert cli.main(["relabel", "--filter", "lowest"]) == 2


@pytest.mark.parametrize("smoothing", [0.1, 0.0])
def test_a_run_trained_with_label_smoothing_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], smoothing: float
) -> None:
    import yaml

    cfg, _ = _stage(tmp_path, False)
    run = paths.run_dir(cfg).root
    saved = cfg.to_dict()
    saved["train"]["label_smoothing"] = smoothing
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    relabel.run(cfg)
    out = " ".join(capsys.readouterr().out.split())
    assert ("trained with train.label_smoothing=0.1" in out) == (smoothing > 0)
    # the same through an ensemble JSON naming the run (relabel --from runs/ensembles/<exp>.json)
    ens = tmp_path / "ens.json"
    ens.write_text(json.dumps({"members": [{"run": str(run), "view": "identity", "weight": 1.0}]}))
    relabel.run(cfg, sources=[str(ens)])
    out = " ".join(capsys.readouterr().out.split())
    assert ("trained with train.label_smoothing=0.1" in out) == (smoothing > 0)
