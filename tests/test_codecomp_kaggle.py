"""Code competitions against the real kaggle client and tests/fake_kaggle.py: the package dataset
(create, version, status), the notebook (push, status, output) and the code submission with its score.

The package and notebook folders are written by hand here (no wheel build); test_codecomp.py makes
real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import CLASSES, tiny_config
from fake_kaggle import FakeKaggle
from kpipe import paths
from kpipe.config import Config
from kpipe.data.ingest import save_classes
from kpipe.errors import KpipeError
from kpipe.io import write_json, write_text
from kpipe.kaggle import datasets, kernels, ledger, notebook
from kpipe.kaggle.api import KaggleError
from kpipe.stages import kaggle, kernel
from test_kaggle import TEST_IDS, TRUTH
from test_kaggle import fake as fake  # noqa: F401  (the fixture)

OWNER = "kpipe-tester"


@pytest.fixture
def cfg(tmp_path: Path, tiny_comp: Path) -> Config:
    comp = yaml.safe_load(tiny_comp.read_text())
    tiny_comp.write_text(yaml.safe_dump({**comp, "kaggle_slug": "tiny"}))
    config = tiny_config(
        tmp_path,
        tiny_comp,
        [
            "name=a",
            f"paths.packages_dir={tmp_path / 'package'}",
            f"paths.kernels_dir={tmp_path / 'kernels'}",
            f"package.owner={OWNER}",
        ],
    )
    save_classes(config, CLASSES)
    return config


def hand_package(cfg: Config) -> paths.PackageDir:
    where = paths.package_dir(cfg)
    write_json(
        where.spec,
        {
            "format": 1,
            "name": "a-package",
            "runs": [{"tag": "a", "source": "runs/a", "folds": [0], "views": ["identity"]}],
            "cv": 0.9,
            "metric": "accuracy",
        },
    )
    write_text(where.run("a") / "fold0.json", "{}")
    write_json(
        where.metadata,
        {"title": "kpipe a-package", "id": f"{OWNER}/a-package", "licenses": [{"name": "CC0-1.0"}]},
    )
    write_json(where.manifest, {"files": [], "bytes": 0, "sha256": "f" * 64})
    return where


def hand_kernel(cfg: Config) -> paths.KernelDir:
    kd = paths.kernel_dir(cfg)
    nb = notebook.render(notebook.NotebookSpec("a-package", "tiny", "sample_submission.csv", None, []))
    write_text(kd.notebook, notebook.dumps(nb))
    write_json(kd.metadata, kernel.kernel_metadata(cfg, f"{OWNER}/a-package"))
    return kd


def good_csv() -> bytes:
    return pd.DataFrame({"id": TEST_IDS, "label": TRUTH}).to_csv(index=False).encode()


# ------------------------------------------------------------------ dataset


def test_upload_creates_then_versions_and_waits_until_ready(cfg: Config, fake: FakeKaggle) -> None:
    where = hand_package(cfg)
    fake.dataset_polls = 2
    first = datasets.upload(where.root, "v1")
    assert first == {"ref": f"{OWNER}/a-package", "status": "ready", "created": True}
    assert fake.calls.count("GetDatasetStatus") >= 3  # the existence check, then PROCESSING x2, READY
    stored = fake.datasets[f"{OWNER}/a-package"]
    assert "kpipe_package.json" in stored["versions"][0] and "runs.zip" in stored["versions"][0]
    assert datasets.upload(where.root, "v2")["created"] is False
    assert len(stored["versions"]) == 2 and "CreateDatasetVersion" in fake.calls


def test_dataset_that_fails_processing_is_an_error(cfg: Config, fake: FakeKaggle) -> None:
    fake.dataset_fails = True
    with pytest.raises(KaggleError, match="could not process dataset kpipe-tester/a-package"):
        datasets.upload(hand_package(cfg).root, "v1")


def test_dataset_still_processing_after_the_wait_says_so(
    cfg: Config, fake: FakeKaggle, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.dataset_polls = 10_000
    monkeypatch.setenv("KPIPE_KAGGLE_WAIT_TIMEOUT", "0.05")
    with pytest.raises(KaggleError, match=r"still processing \(blobs_received\).*would not see this version"):
        datasets.upload(hand_package(cfg).root, "v1")


# ------------------------------------------------------------------ notebook


def test_push_waits_and_fetches_output_and_log(cfg: Config, fake: FakeKaggle) -> None:
    hand_package(cfg)
    datasets.upload(paths.package_dir(cfg).root, "v1")
    fake.kernel_outputs = {"submission.csv": good_csv()}
    fake.kernel_polls = 2
    kd = hand_kernel(cfg)
    result = kernels.push(kd)
    assert result["status"] == "complete" and result["version"] == 1
    assert (kd.output / "submission.csv").read_bytes() == good_csv()
    assert (kd.output / "a-infer.log").is_file()
    assert json.loads((kd.output / "push.json").read_text())["version"] == 1
    body = fake.kernels[f"{OWNER}/a-infer"][0]
    assert body["enableInternet"] is False and body["datasetDataSources"] == [f"{OWNER}/a-package"]
    assert body["competitionDataSources"] == ["tiny"] and body["kernelType"] == "notebook"


def test_push_of_a_failing_notebook_quotes_kaggle_and_the_log(cfg: Config, fake: FakeKaggle) -> None:
    hand_package(cfg)
    datasets.upload(paths.package_dir(cfg).root, "v1")
    fake.kernel_failure = "Notebook Timeout"
    fake.kernel_log = "loading 5 folds\nTraceback (most recent call last):\nRuntimeError: boom\n"
    with pytest.raises(KpipeError, match=r"ended error: Notebook Timeout(.|\n)*RuntimeError: boom"):
        kernels.push(hand_kernel(cfg))


def test_push_without_the_dataset_is_refused(cfg: Config, fake: FakeKaggle) -> None:
    with pytest.raises(KaggleError, match="Dataset sources not found"):
        kernels.push(hand_kernel(cfg))


# ------------------------------------------------------------------ code submission


def pushed(cfg: Config, fake: FakeKaggle, outputs: dict[str, bytes]) -> str:
    hand_package(cfg)
    datasets.upload(paths.package_dir(cfg).root, "v1")
    fake.kernel_outputs = outputs
    return kernels.push(hand_kernel(cfg))["ref"]


def test_submit_kernel_waits_for_the_score_and_records_it(cfg: Config, fake: FakeKaggle) -> None:
    ref = pushed(cfg, fake, {"submission.csv": good_csv()})
    row = kaggle.submit_kernel(cfg, ref, 1, None, wait=True)
    assert row["status"] == "complete" and row["public_score"] == "1.00000"
    book = ledger.read(paths.ledger_csv(cfg)).iloc[-1]
    assert book["kernel"] == ref and book["kernel_version"] == "1" and book["package_sha256"] == "f" * 64
    assert book["file"] == f"kernel:{ref}@v1" and book["cv"] == "0.9" and book["runs"] == "runs/a"
    with pytest.raises(KpipeError, match="not submitted again"):
        kaggle.submit_kernel(cfg, ref, 1, None)
    assert kaggle.submit_kernel(cfg, ref, 1, None, force=True)["status"] == "pending"


def test_submit_kernel_without_submission_csv_is_a_scoring_error(cfg: Config, fake: FakeKaggle) -> None:
    ref = pushed(cfg, fake, {"other.csv": b"x"})
    with pytest.raises(KpipeError, match="Submission CSV Not Found"):
        kaggle.submit_kernel(cfg, ref, 1, None, wait=True)
    assert ledger.read(paths.ledger_csv(cfg)).iloc[-1]["status"] == "error"


def test_submit_kernel_at_the_daily_limit_submits_nothing(cfg: Config, fake: FakeKaggle) -> None:
    ref = pushed(cfg, fake, {"submission.csv": good_csv()})
    fake.daily_limit = 0
    with pytest.raises(KpipeError, match="no submissions left today"):
        kaggle.submit_kernel(cfg, ref, 1, None)
    assert "CreateCodeSubmission" not in fake.calls and ledger.read(paths.ledger_csv(cfg)).empty


def test_cli_package_upload_kernel_push_submit(
    tmp_path: Path, cfg: Config, fake: FakeKaggle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The four commands as a user types them, against the fake (the wheel is stubbed: test_codecomp builds one)."""
    from kpipe import cli
    from kpipe.kaggle import package as pkg
    from kpipe.stages import folds
    from test_infer import make_run

    monkeypatch.setattr(
        pkg,
        "build_wheel",
        lambda out: (out.mkdir(parents=True), (out / "kpipe-0-py3-none-any.whl").write_bytes(b"wheel"))[1],
    )
    folds.run(cfg)
    make_run(cfg)
    fake.kernel_outputs = {"submission.csv": good_csv()}
    args = [
        "-c",
        str(tmp_path / "tiny_exp.yaml"),
        "--comp",
        str(tmp_path / "tiny.yaml"),
        "name=a",
        *[
            f"paths.{k}={tmp_path / v}"
            for k, v in {
                "data_root": "data",
                "folds_dir": "folds",
                "runs_dir": "runs",
                "submissions_dir": "submissions",
                "packages_dir": "package",
                "kernels_dir": "kernels",
            }.items()
        ],
        f"package.owner={OWNER}",
    ]
    assert cli.main(["package", *args, "--upload"]) == 0
    assert fake.datasets[f"{OWNER}/a-package"]["versions"][0]["kpipe_package.json"]
    assert cli.main(["kernel", *args, "--push"]) == 0
    assert (paths.kernel_dir(cfg).output / "submission.csv").is_file()
    assert cli.main(["submit", "--kernel", f"{OWNER}/a-infer", "--version", "1", "--wait", *args]) == 0
    row = ledger.read(paths.ledger_csv(cfg)).iloc[-1]
    assert (
        row["public_score"] == "1.00000"
        and row["package_sha256"] == json.loads(paths.package_dir(cfg).manifest.read_text())["sha256"]
    )


def test_lb_shows_csv_and_kernel_submissions_once_each(
    tmp_path: Path, cfg: Config, fake: FakeKaggle, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_kaggle import write_sub

    ref = pushed(cfg, fake, {"submission.csv": good_csv()})
    kaggle.submit_kernel(cfg, ref, 1, None, wait=True)
    kaggle.submit(cfg, write_sub(cfg, "csvsub", TRUTH), None, wait=True)
    capsys.readouterr()
    table = kaggle.lb(cfg)
    assert len(table) == 2 and set(table["source"]) == {"kpipe"}
    assert sorted(table["file"].str.startswith("kernel:")) == [False, True]
    out = capsys.readouterr().out
    assert "a-inf" in out and "csvsu" in out, out  # narrow terminal: names cut
