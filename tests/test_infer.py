"""Inference on hand-built runs (random-weight test_resnet folds; the trainer is not called).

Batched TTA against a per-view loop is covered in test_tta.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config, write_competition
from kpipe import paths
from kpipe.config import Config
from kpipe.data import ingest
from kpipe.errors import KpipeError
from kpipe.eval import metrics
from kpipe.eval import oof as oof_lib
from kpipe.io import read_csv_ids, write_csv, write_json, write_yaml
from kpipe.kaggle import submission
from kpipe.nn import models
from kpipe.stages import folds, infer, oof_tta


def make_run(cfg: Config, seed: int = 0, classes: list[str] | None = None) -> Path:
    """runs/<cfg.name>/: config.yaml, fold<k>/best.pt in train's payload format, a fake oof.csv and cv.json."""
    run = paths.run_dir(cfg).root
    write_yaml(run / "config.yaml", cfg.to_dict())
    classes = classes or ingest.load_classes(cfg)
    table = read_csv_ids(paths.folds_csv(cfg))
    torch.manual_seed(seed)
    for k in sorted(table["fold"].astype(int).unique()):
        model = models.create_from_config(cfg.model, len(classes))
        dc = models.resolve_data_config(model, cfg.data)
        (run / f"fold{k}").mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "classes": classes,
                "config": cfg.to_dict(),
                "data_config": dc,
                "epoch": 1,
                "score": 0.5,
            },
            run / f"fold{k}" / "best.pt",
        )
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(classes)), len(table))
    oof = table[["id", "fold", "label"]].copy()
    for j, c in enumerate(classes):
        oof[f"p_{c}"] = probs[:, j]
    oof.to_csv(run / "oof.csv", index=False)
    write_json(run / "cv.json", {"metric": cfg.competition.metric, "cv": 0.123, "per_fold": {}})
    return run


def setup(tmp_path: Path, overrides: list[str] = (), **comp_kw: object) -> Config:
    comp = write_competition(tmp_path, **comp_kw)
    cfg = tiny_config(tmp_path, comp, ["name=a", *overrides])
    folds.run(cfg)
    make_run(cfg)
    return cfg


def _probs(cfg: Config, name: str) -> pd.DataFrame:
    return read_csv_ids(Path(cfg.paths.predictions_dir) / name / "probs.csv").set_index("id").astype(float)


@pytest.mark.parametrize(
    "layout,labels,proba",
    [
        ("csv", None, False),  # string labels
        ("folders", None, False),
        ("csv", ["0", "1", "10"], False),  # integer labels: numeric class order, written as the same digits
        ("csv", None, True),  # one probability column per class
    ],
)
def test_submission_matches_sample(
    tmp_path: Path, layout: str, labels: list[str] | None, proba: bool
) -> None:
    cfg = setup(tmp_path, layout=layout, labels=labels)
    classes = ingest.load_classes(cfg)
    sample_path = paths.data_dir(cfg) / cfg.competition.sample_submission
    if proba:
        sample = read_csv_ids(sample_path)
        pd.DataFrame({"id": sample["id"], **{c: 1 / 3 for c in reversed(classes)}}).to_csv(
            sample_path, index=False
        )
    result = infer.run(cfg)
    sub_path = Path(result["submission"])
    sub, sample = read_csv_ids(sub_path), read_csv_ids(sample_path)
    assert list(sub.columns) == list(sample.columns)
    assert sub["id"].tolist() == sample["id"].tolist()
    assert [p for p in submission.validate_file(sub_path, cfg) if p.severity == "error"] == []
    if proba:
        assert np.allclose(sub[list(reversed(classes))].astype(float).sum(axis=1), 1.0, atol=1e-6)
    else:
        assert set(sub["label"]) <= set(classes)
    pred = Path(result["predictions"])
    assert json.loads((pred / "classes.json").read_text()) == classes
    assert read_csv_ids(pred / "ids.csv")["id"].tolist() == sample["id"].tolist()
    probs = _probs(cfg, "a")
    assert list(probs.columns) == [f"p_{c}" for c in classes]
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    index = json.loads((pred / "members.json").read_text())
    assert len(index) == 2 * 2  # folds x views
    assert all(np.load(pred / m["file"]).shape == (len(sample), len(classes)) for m in index)
    side = json.loads(sub_path.with_suffix(".json").read_text())
    assert (
        side["cv"] == 0.123
        and side["tta"] == ["identity", "hflip"]
        and side["folds"] == {str(paths.run_dir(cfg).root): [0, 1]}
    )
    assert side["n_unreadable"] == 0 and side["weights"] is None
    decode = side["decode"][str(paths.run_dir(cfg).root)]  # infer.decode=auto without CUDA: the CPU workers
    assert decode["decode"] == "cpu" and "no CUDA" in decode["reason"]


def test_unreadable_test_images_get_the_prior(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = setup(tmp_path)
    test_dir = paths.data_dir(cfg) / "test"
    (test_dir / "t001.png").write_bytes(b"")
    (test_dir / "t002.png").write_text("not an image")
    sample_path = paths.data_dir(cfg) / "sample_submission.csv"
    sample = read_csv_ids(sample_path)
    pd.concat([sample, pd.DataFrame({"id": ["t999"], "label": ["cat"]})]).to_csv(sample_path, index=False)
    result = infer.run(cfg)
    bad = ["t001", "t002", "t999"]
    assert sorted(result["unreadable"]) == bad and result["n_unreadable"] == 3
    out = capsys.readouterr().out
    assert "3 test images could not be read" in out and all(i in out for i in bad)
    sub = read_csv_ids(result["submission"])
    assert sub["id"].tolist() == [*sample["id"], "t999"]
    prior = infer.class_prior(read_csv_ids(paths.folds_csv(cfg))["label"].tolist(), ingest.load_classes(cfg))
    probs = _probs(cfg, "a")
    np.testing.assert_allclose(probs.loc[bad].to_numpy(), np.tile(prior, (3, 1)), atol=1e-6)
    assert not np.allclose(probs.loc["t000"].to_numpy(), prior, atol=1e-6)
    reasons = read_csv_ids(Path(result["predictions"]) / "unreadable.csv").set_index("id")["reason"]
    assert reasons["t999"] == "file not found" and reasons["t001"] == "not decodable"


def test_decode_on_the_device_predicts_as_the_cpu_decoder(tmp_path: Path) -> None:
    """infer.decode=gpu run on the CPU (torchvision decodes there): same probabilities, the choice in the sidecar."""
    comp = write_competition(tmp_path)
    cfg = tiny_config(tmp_path, comp, ["name=a", "infer.decode=gpu"])
    folds.run(cfg)
    make_run(cfg)
    for p in (paths.data_dir(cfg) / "test").glob("*.png"):
        # JPEG bytes under the test's own file names (decoders go by content): what the device decoder takes.
        ok, buf = cv2.imencode(".jpg", cv2.imread(str(p)), [cv2.IMWRITE_JPEG_QUALITY, 95])
        p.write_bytes(buf.tobytes())
    run = str(paths.run_dir(cfg).root)
    on_device = infer.run(cfg)
    on_cpu = infer.run(tiny_config(tmp_path, comp, ["name=a", "infer.decode=cpu", "infer.name=b"]))
    assert on_device["decode"][run]["decode"] == "gpu" and on_cpu["decode"][run]["decode"] == "cpu"
    side = json.loads(Path(on_device["submission"]).with_suffix(".json").read_text())
    assert side["decode"] == on_device["decode"]
    np.testing.assert_allclose(_probs(cfg, "a").to_numpy(), _probs(cfg, "b").to_numpy(), atol=2e-3)


def test_class_prior_and_blend() -> None:
    np.testing.assert_allclose(infer.class_prior(["b", "b", "a", "b"], ["a", "b", "c"]), [0.25, 0.75, 0.0])
    p = np.array([[0.9, 0.1], [0.5, 0.5]], np.float32)
    q = np.array([[0.1, 0.9], [0.5, 0.5]], np.float32)
    members = [
        infer.MemberPred("r1", 0, "identity", p),
        infer.MemberPred("r1", 1, "identity", p),
        infer.MemberPred("r2", 0, "identity", q),
    ]
    # Runs weigh equally whatever their fold count.
    np.testing.assert_allclose(
        infer.blend_members(members, "mean", None), [[0.5, 0.5], [0.5, 0.5]], atol=1e-7
    )
    w = infer.blend_members(members, "mean", {("r1", "identity"): 0.0, ("r2", "identity"): 1.0})
    np.testing.assert_array_equal(w, q.astype(np.float64))
    # A rank_mean ensemble: folds are averaged as probabilities, then the runs' column ranks are blended.
    r = infer.blend_members(members, "rank_mean", {("r1", "identity"): 0.5, ("r2", "identity"): 0.5})
    np.testing.assert_allclose(r, [[0.5, 0.5], [0.5, 0.5]])


def test_oof_tta_writes_one_file_per_view(tmp_path: Path) -> None:
    cfg = setup(tmp_path)
    scores = oof_tta.run(cfg)
    run = paths.run_dir(cfg).root
    assert set(scores[str(run)]) == {"identity", "hflip", "mean"}
    oof_cols = list(read_csv_ids(run / "oof.csv").columns)
    train_ids = sorted(read_csv_ids(paths.folds_csv(cfg))["id"])
    for view in ("identity", "hflip"):
        df = read_csv_ids(run / "oof_tta" / f"{view}.csv")
        assert list(df.columns) == oof_cols
        assert sorted(df["id"]) == train_ids and df["id"].is_unique
    # The files are members `kpipe ensemble` can use.
    ref, members = oof_lib.load_members([str(run)], include_tta=True)
    assert {m.view for m in members} == {"identity", "hflip"}
    # Now that both views are scored, a TTA submission's sidecar carries their OOF CV, and says so.
    side = infer.run(cfg)
    labels = np.array([ref.classes.index(x) for x in ref.labels])
    expected = metrics.score(cfg.competition.metric, labels, np.mean([m.probs for m in members], axis=0))
    assert side["cv"] == pytest.approx(expected) and side["cv_source"] == "OOF with the same TTA views"


def test_ensemble_weights_are_honoured(tmp_path: Path) -> None:
    cfg = setup(tmp_path)
    make_run(cfg.model_copy(update={"name": "b"}), seed=1)
    run_a, run_b = str(paths.run_dir(cfg).root), str(Path(cfg.paths.runs_dir) / "b")
    infer.run(cfg.model_copy(update={"name": "only_b"}), runs=[run_b])
    infer.run(cfg.model_copy(update={"name": "only_a"}), runs=[run_a])
    infer.run(cfg.model_copy(update={"name": "both"}), runs=[run_a, run_b])
    a, b = _probs(cfg, "only_a"), _probs(cfg, "only_b")
    np.testing.assert_allclose(_probs(cfg, "both"), (a + b) / 2, atol=1e-6)
    both = json.loads((Path(cfg.paths.submissions_dir) / "both.json").read_text())
    assert both["cv"] is not None and both["runs"] == [run_a, run_b]  # equal blend of the two oof.csv

    weights = Path(tmp_path) / "weights.json"
    # Unequal, non-trivial, unnormalised weights: run b counts three times as much as run a.
    members = [
        {"run": r, "view": v, "weight": w}
        for r, w in ((run_a, 0.2), (run_b, 0.6))
        for v in ("identity", "hflip")
    ]
    write_json(
        weights,
        {
            "metric": "accuracy",
            "how": "mean",
            "cv_blend": 0.77,
            "classes": ingest.load_classes(cfg),
            "members": members,
        },
    )
    wcfg = cfg.model_copy(
        update={"name": "weighted", "infer": cfg.infer.model_copy(update={"ensemble_weights": str(weights)})}
    )
    result = infer.run(wcfg)
    weighted = _probs(cfg, "weighted")
    np.testing.assert_allclose(weighted, 0.25 * a + 0.75 * b, atol=1e-6)  # the hand-weighted mean
    assert (
        float(np.abs(weighted - (a + b) / 2).to_numpy().max()) > 1e-3
    )  # ...which ignoring the weights would not give
    assert result["cv"] == 0.77 and result["runs"] == [run_a, run_b] and len(result["weights"]) == 4
    with pytest.raises(KpipeError, match="blends runs"):
        infer.run(wcfg, runs=[run_a])


def test_checkpoint_classes_must_match(tmp_path: Path) -> None:
    cfg = setup(tmp_path)
    make_run(cfg, classes=["cat", "dog", "eel"])
    with pytest.raises(KpipeError, match="re-train"):
        infer.run(cfg)


def test_invalid_submission_is_refused(tmp_path: Path) -> None:
    cfg = setup(tmp_path)
    classes = ingest.load_classes(cfg)
    sample_path = paths.data_dir(cfg) / cfg.competition.sample_submission
    ids = read_csv_ids(sample_path)["id"].tolist()
    pd.DataFrame({"id": ids, **{c: 1 / 3 for c in classes}}).to_csv(sample_path, index=False)
    probs = np.full((len(ids), 3), 0.5)  # rows sum to 1.5
    out = tmp_path / "bad.csv"
    with pytest.raises(KpipeError, match="refusing"):
        infer.write_submission(cfg, probs, ids, classes, out)
    assert not out.exists()


def test_infer_joins_no_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kpipe infer only needs a device: inside a torchrun job's environment it must not wait for a DDP rendezvous."""
    import torch.distributed as torch_dist

    cfg = setup(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; no peer will ever join
    monkeypatch.setenv("RANK", "0")

    def no_rendezvous(*_: object, **__: object) -> None:
        raise AssertionError("kpipe infer tried to join a process group")

    monkeypatch.setattr(torch_dist, "init_process_group", no_rendezvous)
    assert infer.run(cfg)["n_unreadable"] == 0
    assert not torch_dist.is_initialized()


def test_oof_tta_scores_each_fold_model_on_the_rows_it_never_trained_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After relabel --apply + folds, the folds file's folds and labels differ from the run's: oof-tta keeps
    the run's own (its oof.csv), so fold k's model never predicts an image it trained on."""
    cfg = setup(tmp_path)
    run = paths.run_dir(cfg).root
    own = read_csv_ids(run / "oof.csv")[["id", "fold", "label"]]
    folds_csv = paths.folds_csv(cfg)
    now = read_csv_ids(folds_csv)
    n = int(now["fold"].max()) + 1
    now["fold"] = (now["fold"].astype(int) + 1) % n  # every row in another fold now
    labels = sorted(now["label"].unique())
    now.loc[0, "label"] = labels[(labels.index(now.loc[0, "label"]) + 1) % len(labels)]  # a relabel
    write_csv(folds_csv, now.drop(index=1))  # and a relabel `drop`: left out of the folds, still scored
    oof_tta.run(cfg)
    assert "rows have another fold or label" in " ".join(capsys.readouterr().out.split())
    for view in ("identity", "hflip"):
        got = read_csv_ids(run / "oof_tta" / f"{view}.csv")[["id", "fold", "label"]]
        pd.testing.assert_frame_equal(
            got.sort_values("id").reset_index(drop=True), own.sort_values("id").reset_index(drop=True)
        )
