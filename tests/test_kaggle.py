"""kpipe.stages.kaggle against the real kaggle client, talking to tests/fake_kaggle.py on 127.0.0.1."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
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
from kpipe.kaggle import ledger
from kpipe.stages import kaggle

TEST_IDS = [f"t{j:03d}" for j in range(6)]
TRUTH = [CLASSES[j % 3] for j in range(6)]  # conftest draws test image j as class j % 3


@pytest.fixture
def fake(tmp_path: Path, tiny_comp: Path, monkeypatch: pytest.MonkeyPatch) -> FakeKaggle:
    """A running fake Kaggle serving the tiny competition, and an environment that reaches it."""
    data = tmp_path / "data" / "tiny"
    files = {p.relative_to(data).as_posix(): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}
    home = tmp_path / "home"
    home.mkdir()
    for var in (
        "no_proxy",
        "NO_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "KAGGLE_API_TOKEN",
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "KAGGLE_CONFIG_DIR",
        "XDG_CONFIG_HOME",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))  # never the developer's own ~/.kaggle
    monkeypatch.setenv(kaggle.ENV_BACKOFF, "0.01")
    monkeypatch.setenv(kaggle.ENV_POLL, "0.01")
    monkeypatch.chdir(tmp_path)  # outside any git repository
    with FakeKaggle("tiny", files, dict(zip(TEST_IDS, TRUTH, strict=True))) as fk:
        for k, v in fk.env().items():
            monkeypatch.setenv(k, v)
        yield fk


@pytest.fixture
def cfg(tmp_path: Path, tiny_comp: Path) -> Config:
    comp = yaml.safe_load(tiny_comp.read_text())
    tiny_comp.write_text(yaml.safe_dump({**comp, "kaggle_slug": "tiny"}))
    config = tiny_config(tmp_path, tiny_comp)
    save_classes(config, CLASSES)  # what `kpipe folds` leaves for submission validation
    return config


def write_sub(cfg: Config, name: str, labels: list[str], cv: float | None = 0.9) -> Path:
    out = Path(cfg.paths.submissions_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    pd.DataFrame({"id": TEST_IDS, "label": labels}).to_csv(path, index=False)
    if cv is not None:
        (out / f"{name}.json").write_text(
            json.dumps(
                {
                    "runs": ["runs/a", "runs/b"],
                    "cv": cv,
                    "metric": "accuracy",
                    "sha256": ledger.sha256_file(path),
                }
            )
        )
    return path


# ------------------------------------------------------------------ download


def download_cfg(tmp_path: Path) -> Config:
    comp = tmp_path / "dl.yaml"
    comp.write_text(yaml.safe_dump({"name": "tinydl", "kaggle_slug": "tiny"}))
    return tiny_config(tmp_path, comp)


def test_download_unzips_skips_when_complete_and_keeps_kpipe_files(tmp_path: Path, fake: FakeKaggle) -> None:
    cfg = download_cfg(tmp_path)
    dest = kaggle.download(cfg)
    assert dest == paths.data_dir(cfg)
    assert (dest / "train.csv").read_bytes() == fake.files["train.csv"]
    assert (dest / "test" / "t000.png").read_bytes() == fake.files["test/t000.png"]
    assert kaggle.is_complete(dest, "tiny")
    assert not list(dest.parent.glob(".tinydl.download-*")), "staging folder left behind"

    kaggle.download(cfg)  # complete: no second download
    assert fake.calls.count("DownloadDataFiles") == 1

    (dest / "train.csv").write_text("truncated")  # damaged: no longer complete
    (dest / "audit").mkdir()
    (dest / "audit" / "report.csv").write_text("kpipe's own")
    kaggle.download(cfg)
    assert fake.calls.count("DownloadDataFiles") == 2
    assert (dest / "train.csv").read_bytes() == fake.files["train.csv"]
    assert (dest / "audit" / "report.csv").read_text() == "kpipe's own"

    kaggle.download(cfg, force=True)
    assert fake.calls.count("DownloadDataFiles") == 3


def test_download_one_file(tmp_path: Path, fake: FakeKaggle) -> None:
    cfg = download_cfg(tmp_path)
    path = kaggle.download(cfg, file="sample_submission.csv")
    assert path.read_bytes() == fake.files["sample_submission.csv"]
    assert not (paths.data_dir(cfg) / "train.csv").exists()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_download_unpacks_zips_inside_the_zip(tmp_path: Path, fake: FakeKaggle) -> None:
    # Older competitions ship train.zip / test.zip / sample_submission.csv.zip inside the archive.
    fake.files = {
        "train.zip": _zip({"train/a.png": b"a", "train/b.png": b"b"}),  # one folder: unpacked in place
        "test.zip": _zip({"x.png": b"x", "y.png": b"y"}),  # loose files: into test/
        "sample_submission.csv.zip": _zip({"sample_submission.csv": b"id,label\n"}),
        "train.csv": b"id,label\n",
    }
    dest = kaggle.download(download_cfg(tmp_path))
    found = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert found == [
        kaggle.MARKER,
        "sample_submission.csv",
        "test/x.png",
        "test/y.png",
        "train.csv",
        "train/a.png",
        "train/b.png",
    ]
    assert kaggle.is_complete(dest, "tiny")


def test_download_retries_5xx_then_succeeds(
    tmp_path: Path, fake: FakeKaggle, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fail_next("DownloadDataFiles", 503, times=2)
    fake.fail_next("DownloadDataFiles", 429)
    kaggle.download(download_cfg(tmp_path))
    assert fake.calls.count("DownloadDataFiles") == 4
    assert "retry 3/5" in capsys.readouterr().err


def test_retries_are_bounded(tmp_path: Path, fake: FakeKaggle) -> None:
    fake.fail_next("DownloadDataFiles", 500, times=50)
    with pytest.raises(KpipeError, match="Kaggle answered 500"):
        kaggle.download(download_cfg(tmp_path))
    assert fake.calls.count("DownloadDataFiles") == kaggle.retry_policy().tries


def test_403_says_accept_the_rules(tmp_path: Path, fake: FakeKaggle) -> None:
    fake.rules_accepted = False
    with pytest.raises(
        KpipeError, match=r"accept them on https://www\.kaggle\.com/competitions/tiny/rules first"
    ):
        kaggle.download(download_cfg(tmp_path))
    assert fake.calls == ["DownloadDataFiles"]  # a 403 is not retried


def test_401_names_where_credentials_come_from_never_the_key(
    tmp_path: Path, fake: FakeKaggle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAGGLE_KEY", "wrong-secret-0xabc")
    with pytest.raises(KpipeError) as err:
        kaggle.download(download_cfg(tmp_path))
    assert "401" in str(err.value) and "$KAGGLE_KEY" in str(err.value)
    out = capsys.readouterr()
    assert "wrong-secret-0xabc" not in str(err.value) + out.out + out.err


def test_missing_credentials_say_where_to_put_them(
    tmp_path: Path, fake: FakeKaggle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    with pytest.raises(KpipeError) as err:
        kaggle.download(download_cfg(tmp_path))
    for where in ("kaggle.json", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        assert where in str(err.value)
    assert fake.calls == []


def test_rejected_token_becomes_a_kpipe_error_not_an_exit(
    tmp_path: Path, fake: FakeKaggle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # kaggle's authenticate() prints its own help and calls exit(1) when no credential works.
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "bogus-token-0xdef")
    with pytest.raises(KpipeError, match="could not sign in with the credentials in the KAGGLE_API_TOKEN"):
        kaggle.download(download_cfg(tmp_path))
    out = capsys.readouterr()
    assert "bogus-token-0xdef" not in out.out + out.err
    assert "Authentication required" not in out.out  # the client's own help stays off the screen


def test_credentials_found_in_kaggle_json(
    tmp_path: Path, fake: FakeKaggle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    conf = tmp_path / "kconf"
    conf.mkdir()
    (conf / "kaggle.json").write_text(json.dumps({"username": fake.username, "key": fake.key}))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(conf))
    assert kaggle.credential_source() == str(conf / "kaggle.json")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "some-token")
    assert kaggle.credential_source() == "the KAGGLE_API_TOKEN environment variable"


# ------------------------------------------------------------------ submit


def test_submit_wait_lands_score_in_ledger(
    cfg: Config, fake: FakeKaggle, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_sub(cfg, "good", TRUTH, cv=0.91)
    result = kaggle.submit(cfg, path, "all right", wait=True, force=False)
    assert result["status"] == "complete" and result["public_score"] == "1.00000"
    assert result["remaining"] == fake.daily_limit - 1
    assert fake.calls.count("GetSubmission") == 2  # PENDING first, then COMPLETE
    book = ledger.read(paths.ledger_csv(cfg))
    assert len(book) == 1
    row = book.iloc[0]
    assert row["kaggle_ref"] == str(fake.submissions[0].ref)
    assert (row["status"], row["public_score"], row["private_score"]) == ("complete", "1.00000", "1.00000")
    assert (row["runs"], row["cv"], row["metric"], row["source"]) == (
        "runs/a;runs/b",
        "0.91",
        "accuracy",
        "kpipe",
    )
    assert (row["git_commit"], row["git_dirty"]) == ("", "")  # outside a git repository
    assert row["sha256"] == ledger.sha256_file(path) and row["message"] == "all right"
    assert fake.uploads == [path.read_bytes()]
    out = capsys.readouterr().out
    assert "submissions left today: 4" in out and "public 1.00000" in out
    assert fake.key not in paths.ledger_csv(cfg).read_text() + out


def test_invalid_file_is_refused_before_upload(cfg: Config, fake: FakeKaggle) -> None:
    out = Path(cfg.paths.submissions_dir)
    out.mkdir(parents=True)
    bad = out / "bad.csv"
    pd.DataFrame({"id": TEST_IDS[:-1], "label": TRUTH[:-1]}).to_csv(bad, index=False)
    with pytest.raises(KpipeError, match="nothing was uploaded"):
        kaggle.submit(cfg, bad, "missing a row", wait=False, force=False)
    assert fake.uploads == [] and fake.calls == []
    assert not paths.ledger_csv(cfg).exists()


def test_identical_file_refused_unless_force(cfg: Config, fake: FakeKaggle) -> None:
    first = write_sub(cfg, "one", TRUTH)
    kaggle.submit(cfg, first, "first", wait=False, force=False)
    again = write_sub(cfg, "copy", TRUTH)  # same bytes, other name
    with pytest.raises(KpipeError, match="byte-identical.*--force"):
        kaggle.submit(cfg, again, "again", wait=False, force=False)
    assert len(fake.uploads) == 1
    kaggle.submit(cfg, again, None, wait=False, force=True)  # no message: one made from the sidecar
    book = ledger.read(paths.ledger_csv(cfg))
    assert len(fake.uploads) == 2 and len(book) == 2
    assert book.iloc[1]["message"] == fake.submissions[1].description == "copy: runs a+b, CV 0.9000 accuracy"


def test_server_side_scoring_error_is_shown_and_recorded(cfg: Config, fake: FakeKaggle) -> None:
    fake.solution["t999"] = "cat"  # Kaggle's test set has a row our sample_submission lacks
    path = write_sub(cfg, "stale", TRUTH)
    with pytest.raises(KpipeError, match="could not score stale.csv.*must have 7 rows"):
        kaggle.submit(cfg, path, "stale sample", wait=True, force=False)
    row = ledger.read(paths.ledger_csv(cfg)).iloc[0]
    assert row["status"] == "error" and "must have 7 rows" in row["error"]


def test_daily_limit_reached_is_reported_before_upload(cfg: Config, fake: FakeKaggle) -> None:
    fake.daily_limit = 2
    for j in range(2):
        fake.add_submission(f"old{j}.csv", b"id,label\n")
    with pytest.raises(KpipeError, match="no submissions left today"):
        kaggle.submit(cfg, write_sub(cfg, "late", TRUTH), "too many", wait=False, force=False)
    assert fake.uploads == []


def test_daily_limit_derived_when_the_limits_endpoint_is_missing(cfg: Config, fake: FakeKaggle) -> None:
    fake.daily_limit, fake.limits_endpoint = 1, False
    fake.add_submission("old.csv", b"id,label\n")
    with pytest.raises(KpipeError, match="no submissions left today"):
        kaggle.submit(cfg, write_sub(cfg, "late", TRUTH), "too many", wait=False, force=False)
    assert "GetCompetition" in fake.calls and fake.uploads == []


def test_limit_unknown_then_server_refusal_is_shown(
    cfg: Config, fake: FakeKaggle, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.daily_limit, fake.limits_endpoint, fake.expose_max_daily = 1, False, False
    path = write_sub(cfg, "first", TRUTH)
    result = kaggle.submit(cfg, path, "first", wait=False, force=False)
    assert result["remaining"] is None and "submissions left today: unknown" in capsys.readouterr().out
    with pytest.raises(KpipeError, match="Submission limit reached"):
        kaggle.submit(cfg, write_sub(cfg, "second", TRUTH[::-1]), "second", wait=False, force=False)
    assert len(ledger.read(paths.ledger_csv(cfg))) == 1


def test_lost_reply_after_create_does_not_submit_twice(cfg: Config, fake: FakeKaggle) -> None:
    fake.fail_after("CreateSubmission", 503)
    result = kaggle.submit(cfg, write_sub(cfg, "once", TRUTH), "exactly once", wait=False, force=False)
    assert len(fake.submissions) == 1
    assert result["kaggle_ref"] == str(fake.submissions[0].ref)


# ------------------------------------------------------------------ lb


def test_lb_lists_kpipe_and_kaggle_cli_submissions(
    cfg: Config, fake: FakeKaggle, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal for rich, so the table is one line a row
    kaggle.submit(cfg, write_sub(cfg, "mine", TRUTH, cv=0.95), "via kpipe", wait=True, force=False)
    # Right on the public half (t000-t002), one of three on the private half.
    direct = write_sub(cfg, "direct", TRUTH[:3] + [CLASSES[0]] * 3, cv=0.6)
    broken = Path(cfg.paths.submissions_dir) / "broken.csv"
    broken.write_text("id;label\n")
    script = Path(sys.executable).parent / "kaggle"  # the `kaggle` console command, same environment
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "kaggle"]
    for f, msg in ((direct, "by hand"), (broken, "malformed")):
        done = subprocess.run(
            [*cli, "competitions", "submit", "tiny", "-f", str(f), "-m", msg],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Successfully submitted" in done.stdout
    capsys.readouterr()

    first = kaggle.lb(cfg)  # Kaggle is still scoring the direct ones
    assert sorted(first["source"]) == ["external", "external", "kpipe"]
    assert list(first.sort_values("kaggle_ref")["status"]) == ["complete", "pending", "pending"]
    capsys.readouterr()

    view = kaggle.lb(cfg)  # now scored: the same rows, updated
    assert len(view) == 3
    by_msg = view.set_index("message")
    assert (
        by_msg.loc["by hand", "public_score"] == "1.00000"
        and by_msg.loc["by hand", "private_score"] == "0.33333"
    )
    assert by_msg.loc["by hand", "cv"] == "0.6"  # its file and sidecar are still in submissions/
    assert by_msg.loc["by hand", "sha256"] == ledger.sha256_file(direct)
    assert by_msg.loc["malformed", "status"] == "error" and "columns" in by_msg.loc["malformed", "error"]
    out = capsys.readouterr().out
    assert "via kpipe" in out and "by hand" in out
    assert "'kpipe team' is #1" in out  # 1.0 beats the rivals' 0.95 and 0.40
    assert (Path(cfg.paths.submissions_dir) / "cv_vs_lb.png").stat().st_size > 1000

    assert len(ledger.read(paths.ledger_csv(cfg))) == 3  # nothing added twice
