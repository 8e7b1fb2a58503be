"""kpipe you can trust with other people's files (issue 16): no code runs from a checkpoint, no id or
output name escapes its folder, no image or duplicate class exhausts memory, no non-finite number or
mismatched sidecar reaches the leaderboard, and user strings stay data in the terminal.

Each test here fails with its fix reverted.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import draw, tiny_config, write_competition
from kpipe import cli, paths
from kpipe.config import relative_name
from kpipe.data import ingest
from kpipe.errors import KpipeError
from kpipe.io import read_csv_ids
from kpipe.nn import checkpoint, models, predict
from kpipe.nn.engine import load_checkpoint, save_checkpoint
from kpipe.stages import folds, infer
from test_infer import make_run


def _where(root: Path) -> list[str]:
    """CLI overrides that keep every output under root."""
    dirs = {"data_root": "data", "folds_dir": "folds", "runs_dir": "runs", "predictions_dir": "predictions",
            "submissions_dir": "submissions"}
    return [f"paths.{k}={root / v}" for k, v in dirs.items()] + [f"data.cache_dir={root / 'cache'}"]


# ------------------------------------------------------------------ 1. checkpoints hold data, not code


class _Payload:
    """Unpickling this calls os.system: what a crafted best.pt does to whoever loads it."""

    marker: Path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _crafted(path: Path, marker: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    payload = _Payload()
    payload.marker = marker
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state or {}, "classes": ["cat", "dog", "fox"], "evil": payload}, path)


def test_crafted_checkpoint_is_refused_not_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    comp = write_competition(tmp_path)
    cfg = tiny_config(tmp_path, comp, ["name=a"])
    folds.run(cfg)
    run = make_run(cfg)
    marker = tmp_path / "pwned"
    state = torch.load(run / "fold0" / "best.pt", weights_only=True)["model"]
    _crafted(run / "fold0" / "best.pt", marker, state)
    with pytest.raises(KpipeError, match="fold0/best.pt: refused"):
        predict.load_run(str(run), ["cat", "dog", "fox"], torch.device("cpu"))
    assert not marker.exists()
    argv = ["infer", "-c", str(tmp_path / "tiny_exp.yaml"), "--comp", str(comp), *_where(tmp_path), "--runs", str(run)]
    assert cli.main(argv) != 0
    out = capsys.readouterr()
    assert "refused" in out.out + out.err and "best.pt" in out.out + out.err
    assert not marker.exists()
    # model.weights goes through models.load_weights: refused the same way.
    weights = tmp_path / "shared_weights.pt"
    _crafted(weights, marker)
    with pytest.raises(KpipeError, match="shared_weights.pt"):
        models.load_weights(models.create_from_config(cfg.model, 3), weights)
    assert not marker.exists()


def test_old_format_checkpoint_is_refused_with_what_to_do(tmp_path: Path) -> None:
    old = tmp_path / "last.pt"  # kpipe's former last.pt: numpy RNG state pickled as an array
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, old)
    with pytest.raises(KpipeError, match=r"last.pt: refused: .*numpy.*kpipe before this check.*train the run again"):
        load_checkpoint(old)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(KpipeError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_checkpoint_round_trip_is_plain_data(tmp_path: Path) -> None:
    """numpy values and RNG states survive a weights_only=True load, and the RNGs continue identically."""
    import random

    np.random.seed(3), random.seed(4), torch.manual_seed(5)
    payload = {"model": {"w": torch.ones(2)}, "rng": checkpoint.rng_state(), "score": np.float64(0.25),
               "history": [{"epoch": 1, "val_score": np.float32(0.5), "path": tmp_path}], "arr": np.arange(3)}
    expect = (np.random.rand(), random.random(), torch.rand(1).item())
    save_checkpoint(tmp_path / "x.pt", payload)
    ck = torch.load(tmp_path / "x.pt", weights_only=True)
    assert ck["score"] == 0.25 and type(ck["score"]) is float and ck["history"][0]["path"] == str(tmp_path)
    assert torch.equal(ck["arr"], torch.arange(3))
    checkpoint.set_rng_state(load_checkpoint(tmp_path / "x.pt")["rng"])
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expect
    with pytest.raises(TypeError, match="checkpoint"):
        save_checkpoint(tmp_path / "y.pt", {"model": {}, "bad": object()})


# ------------------------------------------------------------------ 2. every path stays inside its root


def test_train_ids_that_leave_the_folder_are_refused(tmp_path: Path) -> None:
    comp = write_competition(tmp_path)
    cfg = tiny_config(tmp_path, comp)
    data = paths.data_dir(cfg)
    secret = tmp_path / "secret.png"  # a readable image outside the data folder
    cv2.imwrite(str(secret), np.zeros((32, 32, 3), np.uint8))
    (data / "secret.png").write_bytes(secret.read_bytes())  # one level up from train/
    escaping = ["../secret", str(secret), "sub/../../secret.png", str(secret.with_suffix(""))]
    table = read_csv_ids(data / "train.csv")
    extra = pd.DataFrame({"id": escaping, "label": "cat"})
    pd.concat([table, extra]).to_csv(data / "train.csv", index=False)
    ing = ingest.load_train(cfg)
    assert not ing.df["path"].str.contains("secret").any() and len(ing.df) == len(table)
    refused = ing.excluded.set_index("id").loc[escaping, "reason"]
    assert (refused == ingest.OUTSIDE).all()
    problem = next(p for p in ing.problems if p.kind == "ids outside the image folder")
    assert problem.severity == "error" and set(problem.ids) == set(escaping)
    assert ingest.leaves_folder("..\\x") and ingest.leaves_folder("C:\\x") and ingest.leaves_folder("a\0b")
    assert not ingest.leaves_folder("sub/abc.jpg") and not ingest.leaves_folder("a..b") and not ingest.leaves_folder("x:1")


def test_test_ids_that_leave_the_folder_get_the_prior(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    comp = write_competition(tmp_path)
    cfg = tiny_config(tmp_path, comp, ["name=a"])
    folds.run(cfg)
    make_run(cfg)
    data = paths.data_dir(cfg)
    cv2.imwrite(str(data / "outside.png"), draw(0, np.random.default_rng(0)))  # data/tiny/outside.png exists
    sample = read_csv_ids(data / "sample_submission.csv")
    escaping = ["../outside", str(data / "outside")]
    pd.concat([sample, pd.DataFrame({"id": escaping, "label": "cat"})]).to_csv(data / "sample_submission.csv",
                                                                                 index=False)
    test = ingest.load_test(cfg)
    assert test.set_index("id").loc[escaping, "path"].eq("").all()
    assert [p.kind for p in ingest.check_test(test, cfg)] == ["test ids outside the image folder"]
    result = infer.run(cfg)
    sub = read_csv_ids(result["submission"])
    assert sub["id"].tolist() == [*sample["id"], *escaping]  # no test row dropped
    prior = infer.class_prior(read_csv_ids(paths.folds_csv(cfg))["label"].tolist(), ingest.load_classes(cfg))
    probs = read_csv_ids(Path(result["predictions"]) / "probs.csv").set_index("id").astype(float)
    np.testing.assert_allclose(probs.loc[escaping].to_numpy(), np.tile(prior, (2, 1)), atol=1e-6)
    reasons = read_csv_ids(Path(result["predictions"]) / "unreadable.csv").set_index("id")["reason"]
    assert (reasons.loc[escaping] == ingest.OUTSIDE).all()
    assert "2 refused: id outside the test folder" in capsys.readouterr().out


@pytest.mark.parametrize("override", ["name=../evil", "infer.name=a/b", "competition.name=..", "name=x\x1b[2J",
                                      "infer.name=/abs"])
def test_output_names_must_be_plain(tmp_path: Path, override: str) -> None:
    comp = write_competition(tmp_path)
    with pytest.raises(KpipeError, match="must be a plain name"):
        tiny_config(tmp_path, comp, [override])


def test_download_file_must_stay_in_the_data_folder(tmp_path: Path) -> None:
    from kpipe.stages import kaggle

    cfg = tiny_config(tmp_path, write_competition(tmp_path))
    for bad in ["../x.csv", "/etc/passwd", "a/../../x"]:
        with pytest.raises(KpipeError, match="kaggle download --file"):
            kaggle.download(cfg, file=bad)
    assert relative_name("train/1.jpg", "f") == "train/1.jpg"
