"""The submissions ledger: fixed columns, atomic and concurrent-safe writes, merging Kaggle's list."""

from __future__ import annotations

import io
import json
import multiprocessing
import multiprocessing.synchronize
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from kpipe.errors import KpipeError
from kpipe.kaggle import ledger


def _append_many(path: Path, who: str, n: int, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait(timeout=60)  # both writers begin together: their appends overlap
    for i in range(n):
        ledger.append(path, [{"competition": "c", "message": f"{who}-{i}", "file": "café 1.csv"}])


def test_two_processes_appending_at_once_lose_nothing(tmp_path: Path) -> None:
    path, n = tmp_path / "submissions" / "ledger.csv", 40
    ctx = multiprocessing.get_context("fork")  # the test's imports are already done: no start-up skew
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(path, who, n, start)) for who in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    df = ledger.read(path)
    assert sorted(df["message"]) == sorted(f"{w}-{i}" for w in "ab" for i in range(n))
    assert list(df.columns) == list(ledger.COLUMNS)
    assert (df["file"] == "café 1.csv").all()
    # Each process's own rows stay in the order it wrote them.
    for who in "ab":
        mine = [m for m in df["message"] if m.startswith(who)]
        assert mine == [f"{who}-{i}" for i in range(n)]


def test_read_absent_is_empty_and_rows_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ledger.csv"
    assert list(ledger.read(path).columns) == list(ledger.COLUMNS) and ledger.read(path).empty
    ledger.append(
        path,
        [
            {
                "competition": "c",
                "sha256": "00ab",
                "kaggle_ref": "007",
                "cv": 0.5,
                "runs": ["runs/a", "runs/b"],
                "git_dirty": True,
            }
        ],
    )
    row = ledger.read(path).iloc[0]
    assert (row["sha256"], row["kaggle_ref"], row["cv"], row["runs"], row["git_dirty"], row["error"]) == (
        "00ab",
        "007",
        "0.5",
        "runs/a;runs/b",
        "true",
        "",
    )
    assert not list(tmp_path.glob(".ledger.csv.*.tmp")), "atomic write left a temp file"


def test_unknown_keys_and_columns_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not ledger columns"):
        ledger.make_row({"score": "1"})
    path = tmp_path / "ledger.csv"
    path.write_text("time_utc,mystery\n2024-01-01,x\n")
    with pytest.raises(KpipeError, match="unexpected columns.*mystery"):
        ledger.read(path)


def test_older_ledger_without_newer_columns_reads(tmp_path: Path) -> None:
    path = tmp_path / "ledger.csv"
    path.write_text("time_utc,competition,kaggle_ref\n2024-01-01T00:00:00Z,c,5\n")
    df = ledger.read(path)
    assert list(df.columns) == list(ledger.COLUMNS) and df.iloc[0]["error"] == ""


def test_update_ref_touches_only_that_row(tmp_path: Path) -> None:
    path = tmp_path / "ledger.csv"
    ledger.append(
        path,
        [
            {"competition": "c", "kaggle_ref": "1"},
            {"competition": "c", "kaggle_ref": "2"},
            {"competition": "other", "kaggle_ref": "1"},
        ],
    )
    ledger.update_ref(path, "c", "1", {"status": "complete", "public_score": "0.9"})
    df = ledger.read(path)
    assert list(df["status"]) == ["complete", "", ""]
    assert list(df["public_score"]) == ["0.9", "", ""]


def remote(ref: str, file: str, when: str, **kw: str) -> dict[str, str]:
    return {
        "kaggle_ref": ref,
        "file": file,
        "time_utc": when,
        "message": kw.pop("message", ""),
        "status": "complete",
        "public_score": "0.8",
        "private_score": "",
        "error": "",
        **kw,
    }


def test_merge_remote_updates_matches_and_adds() -> None:
    base = pd.DataFrame(
        [
            ledger.make_row(
                {
                    "competition": "c",
                    "file": "subs/a.csv",
                    "time_utc": "2024-05-01T10:00:00Z",
                    "kaggle_ref": "11",
                    "status": "pending",
                    "source": "kpipe",
                }
            ),
            # submitted by kpipe, but the reply with its ref was lost
            ledger.make_row(
                {
                    "competition": "c",
                    "file": "subs/b.csv",
                    "time_utc": "2024-05-01T11:00:00Z",
                    "status": "pending",
                    "source": "kpipe",
                }
            ),
            ledger.make_row(
                {"competition": "other", "file": "subs/b.csv", "time_utc": "2024-05-01T11:00:00Z"}
            ),
        ]
    )
    subs = [
        remote("11", "a.csv", "2024-05-01T10:00:05Z"),
        remote("12", "b.csv", "2024-05-01T11:03:00"),  # Kaggle's naive UTC; 3 min off: the same one
        remote("13", "b.csv", "2024-05-02T09:00:00Z", message="made with the kaggle CLI"),  # a day later
    ]
    seen = []
    out = ledger.merge_remote(base, subs, "c", enrich=lambda s: seen.append(s["kaggle_ref"]) or {"cv": "0.7"})
    assert len(out) == 4
    assert list(out["kaggle_ref"]) == ["11", "12", "", "13"]
    assert list(out["status"])[:2] == ["complete", "complete"]
    assert (
        out.iloc[3]["source"] == "external"
        and out.iloc[3]["cv"] == "0.7"
        and out.iloc[3]["competition"] == "c"
    )
    assert seen == ["13"]
    again = ledger.merge_remote(out, subs, "c")
    assert len(again) == 4  # idempotent


def test_best_marks_follow_the_metric_direction() -> None:
    df = pd.DataFrame(
        [ledger.make_row({"public_score": s, "cv": c}) for s, c in [("0.5", "0.4"), ("0.9", ""), ("", "0.1")]]
    )
    assert ledger.best_index(df, "public_score", higher_is_better=True) == 1
    assert ledger.best_index(df, "cv", higher_is_better=False) == 2
    assert ledger.best_index(df, "private_score", higher_is_better=True) is None
    df.loc[0, "message"] = "[/]not [bold markup"  # user text must not be read as rich markup
    table = ledger.render_table(df, True, "t")
    assert table.row_count == 3
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    assert "[/]not [bold markup" in console.file.getvalue()


def test_plot_needs_cv_and_a_score(tmp_path: Path) -> None:
    out = tmp_path / "cv_vs_lb.png"
    df = pd.DataFrame([ledger.make_row({"public_score": "0.5"})])
    assert not ledger.plot_cv_vs_lb(df, out, "t") and not out.exists()
    df = pd.DataFrame(
        [
            ledger.make_row({"public_score": "0.5", "cv": "0.6", "kaggle_ref": "3"}),
            ledger.make_row({"public_score": "0.7", "private_score": "0.65", "cv": "0.75"}),
        ]
    )
    assert ledger.plot_cv_vs_lb(df, out, "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_git_state(tmp_path: Path) -> None:
    assert ledger.git_state(tmp_path) == ("", "")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], cwd=repo, check=True)
    commit, dirty = ledger.git_state(repo)
    assert len(commit) == 40 and dirty == "false"
    (repo / "a.txt").write_text("b")
    assert ledger.git_state(repo) == (commit, "true")


def test_provenance_and_default_message(tmp_path: Path) -> None:
    sub = tmp_path / "r50.csv"
    sub.write_text("id,label\n1,a\n")
    assert ledger.default_message(sub) == "r50"
    assert ledger.provenance(sub) == {"sha256": ledger.sha256_file(sub)}
    (tmp_path / "r50.json").write_text(
        json.dumps(
            {
                "runs": ["runs/r50", "runs/b3"],
                "cv": 0.91234,
                "metric": "accuracy",
                "sha256": ledger.sha256_file(sub),
            }
        )
    )
    assert ledger.default_message(sub) == "r50: runs r50+b3, CV 0.9123 accuracy"
    assert ledger.provenance(sub)["runs"] == ["runs/r50", "runs/b3"]
    (tmp_path / "r50.json").write_text("{not json")
    with pytest.raises(KpipeError, match="r50.json: not valid JSON"):
        ledger.provenance(sub)


NO_FCNTL = """
import sys
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
from kpipe.kaggle import ledger
ledger.append(sys.argv[1], [{"competition": "c", "message": "from a machine without fcntl"}])
print(len(ledger.read(sys.argv[1])))
"""


def test_ledger_works_without_fcntl(tmp_path: Path) -> None:
    """Windows has no fcntl: the ledger (and its lock) must not need it."""
    path = tmp_path / "ledger.csv"
    out = subprocess.run(
        [sys.executable, "-c", NO_FCNTL, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1" and ledger.read(path)["message"].tolist() == [
        "from a machine without fcntl"
    ]
