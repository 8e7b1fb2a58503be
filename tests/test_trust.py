"""kpipe you can trust with other people's files (issue 16): no code runs from a checkpoint, no id or
output name escapes its folder, no image or duplicate class exhausts memory, no non-finite number or
mismatched sidecar reaches the leaderboard, and user strings stay data in the terminal.

Each test here fails with its fix reverted.
"""

from __future__ import annotations

import json
import os
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import draw, path_overrides, tiny_config, write_competition
from fake_kaggle import FakeKaggle
from kpipe import cli, console, paths
from kpipe.config import CompetitionConfig, Config, relative_name
from kpipe.data import dedup, image, ingest
from kpipe.errors import KpipeError
from kpipe.io import read_csv_ids
from kpipe.nn import checkpoint, models, predict
from kpipe.nn.engine import load_checkpoint, save_checkpoint
from kpipe.stages import folds, infer
from test_infer import make_run
from test_kaggle import TRUTH, write_sub
from test_kaggle import cfg as kaggle_cfg  # noqa: F401  (fixtures: test_kaggle's config and fake Kaggle)
from test_kaggle import fake as kaggle_server  # noqa: F401


def _where(root: Path) -> list[str]:
    """CLI overrides that keep every output under root."""
    return path_overrides(root)


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
    argv = [
        "infer",
        "-c",
        str(tmp_path / "tiny_exp.yaml"),
        "--comp",
        str(comp),
        *_where(tmp_path),
        "--runs",
        str(run),
    ]
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
    with pytest.raises(
        KpipeError, match=r"last.pt: refused: .*numpy.*kpipe before this check.*train the run again"
    ):
        load_checkpoint(old)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(KpipeError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_checkpoint_round_trip_is_plain_data(tmp_path: Path) -> None:
    """numpy values and RNG states survive a weights_only=True load, and the RNGs continue identically."""
    import random

    np.random.seed(3), random.seed(4), torch.manual_seed(5)
    payload = {
        "model": {"w": torch.ones(2)},
        "rng": checkpoint.rng_state(),
        "score": np.float64(0.25),
        "history": [{"epoch": 1, "val_score": np.float32(0.5), "path": tmp_path}],
        "arr": np.arange(3),
    }
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
    assert (
        not ingest.leaves_folder("sub/abc.jpg")
        and not ingest.leaves_folder("a..b")
        and not ingest.leaves_folder("x:1")
    )


def test_test_ids_that_leave_the_folder_get_the_prior(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    comp = write_competition(tmp_path)
    cfg = tiny_config(tmp_path, comp, ["name=a"])
    folds.run(cfg)
    make_run(cfg)
    data = paths.data_dir(cfg)
    cv2.imwrite(str(data / "outside.png"), draw(0, np.random.default_rng(0)))  # data/tiny/outside.png exists
    sample = read_csv_ids(data / "sample_submission.csv")
    escaping = ["../outside", str(data / "outside")]
    pd.concat([sample, pd.DataFrame({"id": escaping, "label": "cat"})]).to_csv(
        data / "sample_submission.csv", index=False
    )
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


@pytest.mark.parametrize(
    "override", ["name=../evil", "infer.name=a/b", "competition.name=..", "name=x\x1b[2J", "infer.name=/abs"]
)
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


# ------------------------------------------------------------------ 3. bounded memory


def _png_claiming(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header claims width x height RGB pixels (its data is one empty zlib stream)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_an_image_read_error(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(40000, 40000))
    assert len(bomb.read_bytes()) < 100
    with pytest.raises(image.ImageReadError, match="bomb.png: cannot read image: too large"):
        image.read_rgb(bomb)


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), np.zeros((100, 120, 3), np.uint8))
    assert image.read_rgb(big).shape == (100, 120, 3)  # under the default limit
    monkeypatch.setenv("KPIPE_MAX_PIXELS", "10000")

    def no_decode(*_: object) -> None:
        raise AssertionError("decoded an image over the pixel limit")

    monkeypatch.setattr(image.cv2, "imdecode", no_decode)
    with pytest.raises(image.ImageReadError, match=r"120 x 100 = 12,000 pixels, over the limit of 10,000"):
        image.read_rgb(big)
    monkeypatch.setenv("KPIPE_MAX_PIXELS", "lots")
    with pytest.raises(KpipeError, match="KPIPE_MAX_PIXELS"):
        image.read_rgb(big)


def test_every_opencv_error_is_an_image_read_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = tmp_path / "ok.png"
    cv2.imwrite(str(ok), np.zeros((8, 8, 3), np.uint8))

    def choke(*_: object) -> None:
        raise cv2.error("OpenCV(5.0.0) error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS")

    monkeypatch.setattr(image.cv2, "imdecode", choke)
    with pytest.raises(image.ImageReadError, match="ok.png: cannot read image: OpenCV cannot decode it"):
        image.read_rgb(ok)


def test_infer_gives_a_decompression_bomb_the_prior(tmp_path: Path) -> None:
    comp = write_competition(tmp_path)
    cfg = tiny_config(tmp_path, comp, ["name=a"])
    folds.run(cfg)
    make_run(cfg)
    (paths.data_dir(cfg) / "test" / "t001.png").write_bytes(_png_claiming(40000, 40000))
    result = infer.run(cfg)
    assert result["unreadable"] == ["t001"]
    prior = infer.class_prior(read_csv_ids(paths.folds_csv(cfg))["label"].tolist(), ingest.load_classes(cfg))
    probs = read_csv_ids(Path(result["predictions"]) / "probs.csv").set_index("id").astype(float)
    np.testing.assert_allclose(probs.loc["t001"].to_numpy(), prior, atol=1e-6)


def test_identical_class_pairs_do_not_grow_with_its_square() -> None:
    """5,000 identical thumbnails: the old expansion built 12.5 M pairs (>400 MB) even to list 10."""
    n = 5000
    thumbs = np.zeros((n + 2, 32, 32), np.uint8)
    thumbs[-2:] = np.arange(1024, dtype=np.uint8).reshape(32, 32)  # a second, small class
    g = dedup.dup_graph(np.zeros(n + 2, np.uint64), thumbs, threshold=0, min_similarity=0.97)
    for max_pairs, expect in [(10, 10), (dedup.MAX_PAIRS, n - 1 + 1)]:
        tracemalloc.start()
        a, b, d, s, truncated = dedup.expand_pairs(g, max_pairs)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(a) == expect and truncated == (max_pairs == 10) and peak < 20e6
        assert (a < b).all() and len(set(zip(a.tolist(), b.tolist(), strict=True))) == len(a)
    # The star still links every member to the first one (what leakage and groups read).
    assert set(b[a == 0].tolist()) == set(range(1, n))
    # A small class keeps all its pairs.
    g = dedup.dup_graph(np.zeros(4, np.uint64), np.zeros((4, 32, 32), np.uint8), 0, 0.97)
    assert len(dedup.expand_pairs(g)[0]) == 6


def test_audit_lists_an_identical_class_once_with_its_size(tmp_path: Path) -> None:
    from kpipe.stages import audit

    comp = write_competition(tmp_path)
    cfg = tiny_config(tmp_path, comp)
    data = paths.data_dir(cfg)
    blank = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))[1].tobytes()
    ids = [f"blank{i:03d}" for i in range(dedup.BIG_CLASS + 6)]
    for i in ids:
        (data / "train" / f"{i}.png").write_bytes(blank)
    table = read_csv_ids(data / "train.csv")
    pd.concat([table, pd.DataFrame({"id": ids, "label": "cat"})]).to_csv(data / "train.csv", index=False)
    summary = audit.run(cfg, workers=1)
    classes = read_csv_ids(paths.work_dir(cfg) / "audit" / "identical_classes.csv")
    assert classes.iloc[0][["first_id", "size", "train", "test"]].tolist() == [
        "blank000",
        str(len(ids)),
        str(len(ids)),
        "0",
    ]
    assert summary["largest_identical_class"] == len(ids) and summary["largest_group"] == len(ids)


# ------------------------------------------------------------------ 4. nothing wrong reaches the leaderboard


def test_nan_model_is_an_error_naming_the_run_not_a_submission(tmp_path: Path) -> None:
    comp = write_competition(tmp_path)
    cfg = tiny_config(tmp_path, comp, ["name=a"])
    folds.run(cfg)
    run = make_run(cfg)
    best = run / "fold1" / "best.pt"
    ck = torch.load(best, weights_only=True)
    ck["model"] = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ck["model"].items()
    }
    torch.save(ck, best)
    with pytest.raises(KpipeError, match=r"a/fold1/best.pt, TTA view identity.*not finite"):
        infer.run(cfg)
    assert not paths.submission_csv(cfg, "a").exists()


def test_nan_probabilities_never_become_a_label() -> None:
    from kpipe.kaggle import submission

    comp = CompetitionConfig(name="c")
    sample = pd.DataFrame({"id": ["x", "y"], "label": ["cat", "cat"]})
    probs = np.array([[0.2, 0.8], [np.nan, np.nan]])
    with pytest.raises(KpipeError, match=r"1 of 2 rows .* not finite.*'y'"):
        submission.make_submission(probs, ["x", "y"], ["cat", "dog"], sample, comp)


def test_non_finite_weights_and_oof_are_refused(tmp_path: Path) -> None:
    from kpipe.eval import blend

    p = np.full((4, 2), 0.5)
    for w in ([np.nan, 1.0], [np.inf, 1.0], [-1.0, 2.0]):
        with pytest.raises(KpipeError, match="blend weights must be finite"):
            blend.blend([p, p], np.array(w))
    bad = p.copy()
    bad[2, 1] = np.nan
    with pytest.raises(KpipeError, match=r"runs/b \[identity\] OOF: 1 of 4 rows"):
        blend.fit(
            [p, bad],
            np.array([0, 1, 0, 1]),
            "accuracy",
            names=["runs/a [identity] OOF", "runs/b [identity] OOF"],
        )
    # An ensemble JSON with a NaN weight: NaN > 0 is False, so it used to drop its member silently.
    comp = write_competition(tmp_path)
    cfg = tiny_config(tmp_path, comp, ["name=a"])
    folds.run(cfg)
    run = make_run(cfg)
    weights = tmp_path / "weights.json"
    weights.write_text(
        json.dumps(
            {
                "metric": "accuracy",
                "how": "mean",
                "cv_blend": 0.7,
                "classes": ["cat", "dog", "fox"],
                "members": [
                    {"run": str(run), "view": "identity", "weight": 0.5},
                    {"run": str(run), "view": "hflip", "weight": float("nan")},
                ],
            }
        )
    )
    with pytest.raises(KpipeError, match=r"weights.json: member .* \[hflip\] has weight nan"):
        infer.make_plan(
            cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"ensemble_weights": str(weights)})}),
            None,
            ["cat", "dog", "fox"],
        )


def test_submit_refuses_a_sidecar_of_another_csv(tmp_path: Path) -> None:
    from kpipe.kaggle import ledger
    from kpipe.stages import kaggle

    comp = write_competition(tmp_path)
    cfg = tiny_config(tmp_path, comp, ["name=a"])
    folds.run(cfg)
    make_run(cfg)
    result = infer.run(cfg)
    sub = Path(result["submission"])
    side = json.loads(paths.sidecar(sub).read_text())
    assert side["sha256"] == ledger.sha256_file(sub)
    ledger.check_sidecar(sub)  # matches: fine
    # A later infer killed after writing the CSV and before its sidecar: a new CSV beside the old sidecar.
    table = read_csv_ids(sub)
    table["label"] = table["label"].iloc[::-1].to_numpy() if table["label"].nunique() > 1 else "dog"
    if ledger.sha256_file(sub) == side["sha256"]:
        table.loc[0, "label"] = "fox" if table.loc[0, "label"] != "fox" else "cat"
    table.to_csv(sub, index=False)
    with pytest.raises(
        KpipeError, match=r"a.json records sha256 .* but a.csv has sha256 .*Nothing was uploaded"
    ):
        kaggle.submit(cfg, sub, "m")
    assert not paths.ledger_csv(cfg).exists()
    assert ledger.provenance(sub) == {"sha256": ledger.sha256_file(sub)}  # its runs/CV are not this file's


def test_two_concurrent_submits_of_one_file_upload_once(
    kaggle_cfg: Config,  # noqa: F811
    kaggle_server: FakeKaggle,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, fake = kaggle_cfg, kaggle_server
    from kpipe.kaggle import ledger
    from kpipe.stages import kaggle

    path = write_sub(cfg, "one", TRUTH)
    real_upload = kaggle._upload

    def slow_upload(*args: object, **kwargs: object) -> str:  # widen the window between check and append
        time.sleep(0.5)
        return real_upload(*args, **kwargs)

    monkeypatch.setattr(kaggle, "_upload", slow_upload)
    start, outcomes = threading.Barrier(2), []

    def submit(msg: str) -> None:
        start.wait()
        try:
            kaggle.submit(cfg, path, msg, wait=False, force=False)
            outcomes.append("uploaded")
        except KpipeError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=submit, args=(m,)) for m in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert outcomes.count("uploaded") == 1 and "byte-identical" in "".join(outcomes)
    assert len(fake.uploads) == 1 and len(ledger.read(paths.ledger_csv(cfg))) == 1


# ------------------------------------------------------------------ 5. user strings are data


def test_markup_and_escape_codes_in_labels_and_ids_stay_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = ["[/]x", "dog\x1b[2J\x1b]0;pwned\x07", "[bold red]fox"]
    comp = write_competition(tmp_path, labels=labels)
    data = tmp_path / "data" / "tiny"
    table = read_csv_ids(data / "train.csv")
    table.loc[len(table)] = ["ghost\x1b[31m[/]", labels[0]]  # a row without an image: listed in a problem
    table.to_csv(data / "train.csv", index=False)
    exp = tmp_path / "tiny_exp.yaml"
    tiny_config(tmp_path, comp)  # writes the experiment file
    for stage in ("audit", "folds"):
        assert cli.main([stage, "-c", str(exp), "--comp", str(comp), *_where(tmp_path)]) == 0, stage
    # A submission whose cells carry escape codes and markup: the validator lists them as data.
    sub = tmp_path / "sub.csv"
    pd.DataFrame({"id": ["t000\x1b[2J", "[/]t001"], "label": ["[/]x", "cat\x1b]0;x\x07"]}).to_csv(
        sub, index=False
    )
    assert (
        cli.main(["validate-submission", str(sub), "-c", str(exp), "--comp", str(comp), *_where(tmp_path)])
        == 1
    )
    out = capsys.readouterr()
    text = out.out + out.err
    assert "\x1b" not in text and "\x07" not in text and "[/]t001" in text
    assert "[/]x" in text and "[bold red]fox" in text  # shown as written, not interpreted
    assert console.safe("a\x1b[2Jb\x9bc[/]") == "a?[2Jb?c\\[/]"
