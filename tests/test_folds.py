"""Folds: deterministic, stratified within 1 of ideal, groups never split, K checked against classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config, write_competition
from kpipe import paths
from kpipe.data import folds as folds_lib
from kpipe.data.ingest import load_train
from kpipe.errors import KpipeError
from kpipe.stages import folds


def _labels(n: int = 300, k: int = 7, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"id": [f"i{j}" for j in range(n)], "label": rng.choice([f"c{c}" for c in range(k)], n)}
    )


def test_same_seed_same_folds_other_seed_differs() -> None:
    df = _labels()
    a, b = folds_lib.make_folds(df, 5, 1), folds_lib.make_folds(df, 5, 1)
    assert a.equals(b)
    assert not a["fold"].equals(folds_lib.make_folds(df, 5, 2)["fold"])


def test_stratified_within_one_of_ideal() -> None:
    df = _labels(n=503, k=9)
    out = folds_lib.make_folds(df, 5, 0)
    counts = pd.crosstab(out["label"], out["fold"])
    ideal = counts.sum(axis=1).to_numpy()[:, None] / 5
    assert np.all(np.abs(counts.to_numpy() - ideal) <= 1)
    assert sorted(out["fold"].unique()) == list(range(5))


def test_groups_never_split() -> None:
    df = _labels(n=400, k=4)
    df["group"] = [f"g{j // 3}" for j in range(len(df))]  # groups of 3
    out = folds_lib.make_folds(df, 4, 0, "group")
    assert out.groupby("group")["fold"].nunique().max() == 1


def test_k_too_large_names_class() -> None:
    df = pd.DataFrame({"id": list("abcdefg"), "label": ["x"] * 5 + ["rare"] * 2})
    with pytest.raises(KpipeError, match="class 'rare'.*only 2"):
        folds_lib.make_folds(df, 3, 0)


def test_merge_groups_joins_through_either_column() -> None:
    df = pd.DataFrame({"id": list("abcde"), "g1": ["1", "1", "2", "3", "4"], "g2": ["a", "b", "b", "c", "d"]})
    g = folds_lib.merge_groups(df, ["g1", "g2"])
    assert g.tolist() == ["a", "a", "a", "d", "e"]  # a-b via g1, b-c via g2


def test_apply_label_changes() -> None:
    df = pd.DataFrame({"id": ["a", "b", "c"], "label": ["x", "x", "y"]})
    changes = pd.DataFrame({"id": ["a", "c"], "label": ["y", ""], "action": ["relabel", "drop"]})
    out, summary = folds_lib.apply_label_changes(df, changes)
    assert out.to_dict("list") == {"id": ["a", "b"], "label": ["y", "x"]}
    assert summary.loc["x", "relabelled_from"] == 1 and summary.loc["y", "dropped"] == 1


def test_run_writes_files_and_uses_audit_groups(tmp_path: Path) -> None:
    comp = write_competition(tmp_path, n_per_class=6)
    cfg = tiny_config(tmp_path, comp, ["folds.n_folds=3"])
    # A pair that an ungrouped split of the same rows puts in different folds: grouping must bring it together.
    rows = load_train(cfg).df[["id", "label"]]
    rows = rows[rows["id"] != "fox_005"].reset_index(drop=True)
    ungrouped = folds_lib.make_folds(rows, 3, cfg.folds.seed).set_index("id")["fold"]
    cats = [i for i in ungrouped.index if i.startswith("cat_")]
    pair = next((a, b) for a in cats for b in cats if ungrouped[a] != ungrouped[b])
    audit = paths.work_dir(cfg) / "audit"
    audit.mkdir(parents=True)
    pd.DataFrame({"id": [*pair, "dog_000"], "group": [pair[0], pair[0], "dog_000"]}).to_csv(
        audit / "groups.csv", index=False
    )
    pd.DataFrame({"id": ["fox_005"], "split": ["train"], "path": ["x"], "reason": ["truncated"]}).to_csv(
        audit / "unreadable.csv", index=False
    )
    out = folds.run(cfg)
    written = pd.read_csv(paths.folds_csv(cfg), dtype=str)
    assert len(written) == 17 and "fox_005" not in set(written["id"])
    assert written.set_index("id").loc[list(pair), "fold"].nunique() == 1
    assert set(out.columns) == {"id", "label", "fold", "group"}
    excluded = pd.read_csv(paths.excluded_csv(cfg), dtype=str)
    assert excluded.loc[excluded["id"] == "fox_005", "reason"].item() == "audit: truncated"
    again = folds.run(cfg)
    assert again.equals(out)  # re-running gives the same file
