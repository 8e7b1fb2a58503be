"""User mistakes end in one clear message and a non-zero exit, never in a bare traceback.

Each test runs `kpipe.cli.main(argv)` the way the console script does; an exception escaping
main() (what a user would see as a traceback) fails the test.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_EXP, path_overrides, write_competition
from kpipe import cli


@dataclass
class Tiny:
    root: Path
    comp: Path
    exp: Path

    @property
    def data(self) -> Path:
        return self.root / "data" / "tiny"

    def argv(
        self,
        stage: str,
        *extra: str,
        pre: tuple[str, ...] = (),
        file: str | None = None,
        comp: str | None = None,
    ) -> list[str]:
        """`kpipe <stage> [pre] -c exp --comp comp [file] <paths> <extra>`; outputs all under root."""
        return [
            stage,
            *pre,
            "-c",
            str(self.exp),
            "--comp",
            comp or str(self.comp),
            *([file] if file else []),
            *path_overrides(self.root),
            *extra,
        ]


@pytest.fixture
def tiny(tmp_path: Path) -> Tiny:
    comp = write_competition(tmp_path, n_per_class=4)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(TINY_EXP))
    return Tiny(tmp_path, comp, exp)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit code, stdout + stderr with whitespace runs collapsed)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return rc, " ".join((out.out + out.err).split())


def assert_clear_error(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    rc, text = run_cli(argv, capsys)
    assert rc != 0, text
    assert "Traceback" not in text, text
    squashed = "".join(text.split()).lower()  # rich wraps long paths anywhere, even inside a word
    for w in words:
        assert "".join(w.split()).lower() in squashed, f"{w!r} not in: {text}"
    return text


def _folds(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(tiny.argv("folds"), capsys)[0] == 0


# ------------------------------------------------------------------ config mistakes


def test_unknown_competition_name(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(tiny.argv("audit", comp="nope"), capsys, "nope.yaml", "not found")


@pytest.mark.parametrize("stage, flag", [("infer", "--runs"), ("ensemble", "--runs"), ("relabel", "--from")])
def test_override_after_a_list_flag_is_named(
    tiny: Tiny, capsys: pytest.CaptureFixture[str], stage: str, flag: str
) -> None:
    """`--runs a infer.name=x`: the override went into the list; the message says to move it."""
    argv = [*tiny.argv(stage), flag, "runs/a", "infer.name=x"]
    assert_clear_error(argv, capsys, f"{flag} infer.name=x", "override", f"before {flag}")


def test_missing_experiment_file(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    argv = tiny.argv("folds")
    argv[argv.index("-c") + 1] = str(tiny.root / "nope.yaml")
    assert_clear_error(argv, capsys, "nope.yaml", "not found")


def test_unknown_config_key_suggests_the_right_one(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(
        tiny.argv("folds", "train.lr_rate=3e-4"),
        capsys,
        "unknown key 'train.lr_rate'",
        "did you mean 'train.lr'",
    )


def test_unknown_key_in_a_yaml_file_names_the_file(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    tiny.exp.write_text(yaml.safe_dump({**TINY_EXP, "trian": {"epochs": 1}}))
    assert_clear_error(tiny.argv("folds"), capsys, "exp.yaml", "unknown key 'trian'")


def test_wrong_value_type(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(tiny.argv("folds", "train.epochs=ten"), capsys, "train.epochs", "ten")


def test_wrong_label_column(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(tiny.argv("folds", "competition.label_col=breed"), capsys, "breed", "label_col")


def test_missing_sample_submission(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(
        tiny.argv("audit", "competition.sample_submission=missing.csv"), capsys, "missing.csv", "not found"
    )
    _folds(tiny, capsys)
    assert_clear_error(
        tiny.argv("infer", "competition.sample_submission=missing.csv"), capsys, "missing.csv", "not found"
    )


def test_missing_weights_file(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    _folds(tiny, capsys)
    assert_clear_error(
        tiny.argv("train", "model.weights=missing.pt"), capsys, "model.weights", "missing.pt", "not found"
    )


def test_unknown_model_name(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    _folds(tiny, capsys)
    assert_clear_error(tiny.argv("train", "model.name=resnet_nope"), capsys, "resnet_nope")


def test_more_folds_than_a_class_has(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(tiny.argv("folds", "folds.n_folds=9"), capsys, "folds.n_folds=9", "only 4 images")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_on_a_cpu_machine(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    _folds(tiny, capsys)
    assert_clear_error(tiny.argv("train", "train.device=cuda"), capsys, "train.device=cuda", "no cuda")


def test_zero_epochs(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    _folds(tiny, capsys)
    assert_clear_error(tiny.argv("train", "train.epochs=0"), capsys, "train.epochs")


def test_negative_learning_rate(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    _folds(tiny, capsys)
    assert_clear_error(tiny.argv("train", "train.lr=-1"), capsys, "train.lr")


@pytest.mark.parametrize("override", ["data.batch_size=0", "data.num_workers=-1"])
def test_impossible_loader_settings(tiny: Tiny, capsys: pytest.CaptureFixture[str], override: str) -> None:
    _folds(tiny, capsys)
    assert_clear_error(tiny.argv("train", override), capsys, override.split("=")[0])


# ------------------------------------------------------------------ data mistakes


def test_data_folder_missing(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(
        tiny.argv("folds", f"competition.data_dir={tiny.root / 'nowhere'}"), capsys, "nowhere", "not found"
    )


def test_class_folders_without_images(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    for f in (tiny.data / "train").iterdir():
        f.unlink()
    (tiny.data / "train" / "cat").mkdir()
    for stage in ("audit", "folds"):
        assert_clear_error(tiny.argv(stage, "competition.layout=folders"), capsys, "no images")


def test_test_folder_missing(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(tiny.argv("audit", "competition.test_dir=nope"), capsys, "nope", "not found")


@pytest.mark.parametrize("how", ["empty train dir", "wrong image_ext", "header-only csv"])
def test_no_usable_training_image(tiny: Tiny, capsys: pytest.CaptureFixture[str], how: str) -> None:
    extra: list[str] = []
    if how == "empty train dir":
        for f in (tiny.data / "train").iterdir():
            f.unlink()
    elif how == "wrong image_ext":
        extra = ["competition.image_ext=.jpg"]
    else:
        (tiny.data / "train.csv").write_text("id,label\n")
    assert_clear_error(tiny.argv("folds", *extra), capsys, "train")


@pytest.mark.parametrize(
    "content",
    [b"", "id,label\ncat_000,caf\xe9\n".encode("latin-1"), b'id,label\n"cat_000,cat\ncat_001,cat\n'],
    ids=["empty", "latin-1", "open quote"],
)
def test_unreadable_train_csv(tiny: Tiny, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    (tiny.data / "train.csv").write_bytes(content)
    assert_clear_error(tiny.argv("folds"), capsys, "train.csv")


# ------------------------------------------------------------------ stages out of order


def test_train_before_folds(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(tiny.argv("train"), capsys, "kpipe folds")


def test_infer_before_folds(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert_clear_error(tiny.argv("infer"), capsys, "kpipe folds")


@pytest.mark.parametrize("stage", ["infer", "oof-tta", "relabel"])
def test_stage_before_train(tiny: Tiny, capsys: pytest.CaptureFixture[str], stage: str) -> None:
    _folds(tiny, capsys)
    assert_clear_error(tiny.argv(stage), capsys, "kpipe train")


def test_validate_a_file_that_is_not_there(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    _folds(tiny, capsys)
    missing = str(tiny.root / "submissions" / "nope.csv")
    assert_clear_error(
        ["validate-submission", missing, "-c", str(tiny.exp), "--comp", str(tiny.comp)], capsys, "nope.csv"
    )


def test_validate_a_file_that_is_not_a_csv(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    _folds(tiny, capsys)
    png = str(tiny.data / "test" / "t000.png")
    assert_clear_error(tiny.argv("validate-submission", file=png), capsys, "not a readable utf-8 csv")


# ------------------------------------------------------------------ the command line itself


def test_overrides_may_follow_the_file_argument_and_flags(
    tiny: Tiny, capsys: pytest.CaptureFixture[str]
) -> None:
    _folds(tiny, capsys)
    sample = tiny.data / "sample_submission.csv"
    rc, text = run_cli(tiny.argv("validate-submission", pre=(str(sample),)), capsys)
    assert rc == 0, text
    # ...and a stray word is still refused, by argparse, without a traceback.
    assert_clear_error(
        tiny.argv("validate-submission", "oops", pre=(str(sample),)), capsys, "unrecognized", "oops"
    )


# ------------------------------------------------------------------ the machine


def test_disk_full_says_so(
    tiny: Tiny, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr("kpipe.io.os.replace", full)
    try:
        assert_clear_error(tiny.argv("folds"), capsys, "disk", "full")
    finally:
        monkeypatch.undo()
        # Whatever happened, the write left neither a half file nor its temporary behind.
        folds_dir = tiny.root / "folds"
        assert not (folds_dir / "tiny.csv").exists()
        assert not list(folds_dir.glob(".*.tmp"))
