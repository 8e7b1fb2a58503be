"""Crash safety of `kpipe train`, as a separate process the way a user runs it.

SIGKILL at random moments never leaves a checkpoint torch.load cannot read, and `--resume`
then finishes every epoch. SIGINT / SIGTERM save last.pt, print how to resume, and exit
130 / 143. (Concurrent ledger appends are covered in test_ledger.py.)
Set KPIPE_CRASH_SEED to replay one sequence of kill delays.
"""

from __future__ import annotations

import io
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from rich.console import Console

import kpipe
from conftest import TINY_EXP, path_overrides, tiny_config, write_competition
from kpipe import cli
from kpipe.errors import Interrupted
from kpipe.nn import engine
from kpipe.stages import folds, train

EPOCHS = 20  # ~0.2 s each on 2 CPU cores: kills land in steps, validation and checkpoint writes
MAX_KILLS, MIN_KILLS, KILL_BUDGET_S = 6, 2, 30.0
KILL_WINDOW_S = 4.0  # a kill comes this long at most after the process starts its first fold
START_TIMEOUT_S = 90.0  # importing torch + timm takes 5-15 s on a busy 2-core machine


class Proc:
    """`python -m kpipe <args>` with its stdout collected line by line on a thread."""

    def __init__(self, args: list[str], cwd: Path, new_group: bool = False) -> None:
        # The kpipe under test, whatever the cwd (a relative PYTHONPATH=src would not follow into tmp_path).
        src = str(Path(kpipe.__file__).resolve().parents[1])
        pythonpath = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "400",
            "PYTHONPATH": pythonpath,
        }
        # new_group: its own process group (session), which a scheduler's stop signals as a whole.
        self.p = subprocess.Popen(
            [sys.executable, "-m", "kpipe", *args],
            cwd=cwd,
            env=env,
            text=True,
            encoding="utf-8",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=new_group,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = START_TIMEOUT_S) -> bool:
        """True once a line contains `text`; False if the process ended first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in line for line in list(self.lines)):
                return True
            if self.p.poll() is not None:
                self.reader.join(5)
                return any(text in line for line in self.lines)
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} after {timeout} s:\n{self.output}")

    def finish(self, timeout: float = 120) -> int:
        rc = self.p.wait(timeout)
        self.reader.join(5)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _setup(root: Path) -> list[str]:
    """A 24-image competition with its folds; returns `train` argv (paths under root)."""
    comp = write_competition(root, n_per_class=8)
    exp = root / "crash.yaml"
    exp.write_text(yaml.safe_dump(TINY_EXP))
    base = ["-c", str(exp), "--comp", str(comp), *path_overrides(root)]
    assert cli.main(["folds", *base]) == 0
    return ["train", *base]


def _checkpoints_load(run: Path) -> list[str]:
    """Every best.pt / last.pt present must load; returns their names."""
    found = []
    for ck in sorted(run.glob("fold*/*.pt")):
        payload = torch.load(ck, map_location="cpu", weights_only=False)
        assert "model" in payload, ck
        found.append(f"{ck.parent.name}/{ck.name}")
    for m in run.glob("fold*/metrics.csv"):
        pd.read_csv(m)  # written atomically too: never torn
    return found


def _resume_command(output: str) -> list[str]:
    """The command after 'Resume with:', rejoined if the console wrapped it over lines."""
    flat = " ".join(output.split("\n"))
    assert "Resume with:" in flat, output
    cmd = flat.split("Resume with:", 1)[1].split(" --resume", 1)[0] + " --resume"
    return shlex.split(cmd)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_corrupts_and_resume_completes(tmp_path: Path) -> None:
    args = [*_setup(tmp_path), f"train.epochs={EPOCHS}", "--resume"]
    run = tmp_path / "runs" / "crash"
    seed = int(os.environ.get("KPIPE_CRASH_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    start, kills = time.monotonic(), []
    while len(kills) < MAX_KILLS and (len(kills) < MIN_KILLS or time.monotonic() - start < KILL_BUDGET_S):
        proc = Proc(args, tmp_path)
        if not proc.wait_for("fold "):  # ended before training started: must not be a crash
            assert proc.finish() == 0, proc.output
            break
        delay = rng.uniform(0, KILL_WINDOW_S)
        time.sleep(delay)
        if proc.p.poll() is not None:  # finished every epoch before the kill came
            assert proc.finish() == 0, proc.output
            break
        proc.p.kill()
        proc.finish()
        kills.append(round(delay, 2))
        present = _checkpoints_load(run)  # raises on a torn file
        assert not any(line.startswith("Traceback") for line in proc.lines), proc.output
        print(f"kill {len(kills)} after {delay:.2f} s in training: {present}")
    final = Proc(args, tmp_path)
    assert final.finish() == 0, f"seed {seed}, kills {kills}:\n{final.output}"
    _checkpoints_load(run)
    for k in (0, 1):
        m = pd.read_csv(run / f"fold{k}" / "metrics.csv")
        assert m["epoch"].tolist() == list(range(1, EPOCHS + 1)), f"seed {seed}, kills {kills}: fold {k}\n{m}"
    oof = pd.read_csv(run / "oof.csv", dtype=str)
    assert len(oof) == 24 and oof["id"].is_unique
    assert (run / "cv.json").is_file()
    stray = sorted(p.name for p in run.glob("fold*/.*.tmp"))
    print(f"seed {seed}: {len(kills)} kills at {kills}; temp files left by kills: {stray}")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_saves_last_and_says_how_to_resume(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    args = [*_setup(tmp_path), "train.epochs=500"]
    run = tmp_path / "runs" / "crash"
    proc = Proc(args, tmp_path)
    assert proc.wait_for("fold 0 epoch 1/500"), proc.output  # training is under way
    proc.p.send_signal(sig)
    assert proc.finish(timeout=60) == code, proc.output
    out = proc.output
    assert "Traceback" not in out, out
    cmd = _resume_command(out)
    assert cmd[:2] == ["kpipe", "train"] and cmd[-1] == "--resume", out
    last = torch.load(run / "fold0" / "last.pt", map_location="cpu", weights_only=False)
    assert not last["finished"] and last["epoch"] >= 1
    if sig == signal.SIGTERM:
        return
    # The printed command resumes the run: run it (one more epoch, so it ends soon).
    epochs = last["epoch"] + 1
    again = Proc([*cmd[1:-1], f"train.epochs={epochs}", "--resume"], tmp_path)
    assert again.finish() == 0, again.output
    for k in (0, 1):
        assert pd.read_csv(run / f"fold{k}" / "metrics.csv")["epoch"].tolist() == list(range(1, epochs + 1))


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_to_the_whole_group_with_workers_saves_and_resumes(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """`kill -TERM -- -PGID` (Slurm, timeout, docker stop) or Ctrl-C reaches the DataLoader workers too."""
    args = [*_setup(tmp_path), "train.epochs=500", "data.num_workers=2"]
    run = tmp_path / "runs" / "crash"
    proc = Proc(args, tmp_path, new_group=True)
    assert proc.wait_for("fold 0 epoch 2/500"), proc.output  # workers up, and in their second epoch
    time.sleep(0.3)  # inside a training epoch's steps, most likely
    os.killpg(proc.p.pid, sig)
    assert proc.finish(timeout=60) == code, proc.output
    out = proc.output
    assert "Traceback" not in out and "killed by signal" not in out, out
    cmd = _resume_command(out)
    assert cmd[:2] == ["kpipe", "train"] and cmd[-1] == "--resume", out
    last = torch.load(run / "fold0" / "last.pt", map_location="cpu", weights_only=True)
    assert not last["finished"] and last["epoch"] >= 2


# ------------------------------------------------------------------ the resume line, in-process


def _stopped_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> str:
    """What `kpipe train` prints when a stop request ends it (fold loop replaced by the stop), at 80 columns."""
    cfg = tiny_config(tmp_path, write_competition(tmp_path))
    folds.run(cfg)

    def stopped(*_: object) -> None:
        engine.StopRequested.signum = signal.SIGINT
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(train, "train_fold", stopped)
    monkeypatch.setattr(engine.StopRequested, "signum", None)  # restored after the test: no stop leaks out
    monkeypatch.setattr(cli, "config_from", lambda args: cfg)  # the command line names files this test lacks
    buf = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=buf, width=80))
    assert cli.main(argv[1:]) == 130
    return buf.getvalue()


ARGV = [
    "kpipe",
    "train",
    "-c",
    "configs/exp/b0.yaml",
    "--comp",
    "demo",
    "infer.tta=[identity,hflip]",
    "name=b0",
    "paths.runs_dir=/some/long/folder/name/for/runs/so/that/the/line/is/longer/than/eighty/columns",
]


def test_resume_line_keeps_bracketed_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = " ".join(_stopped_hint(tmp_path, monkeypatch, ARGV).split("\n"))
    assert "infer.tta=[identity,hflip]" in text, text


def test_resume_line_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _stopped_hint(tmp_path, monkeypatch, ARGV)
    line = next(x for x in text.splitlines() if "Resume with:" in x)
    assert line.rstrip().endswith("--resume"), text


def test_resume_hint_survives_paths_with_spaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["kpipe", "train", "-c", "my exps/b0.yaml", "--comp", "demo", "name=café run", "--resume"]
    text = _stopped_hint(tmp_path, monkeypatch, argv)
    line = " ".join(text.split("\n")).split("Resume with:", 1)[1]
    assert shlex.split(line) == ["kpipe", *[a for a in argv[1:] if a != "--resume"], "--resume"]


def test_relabel_quick_stopped_says_to_rerun_relabel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop during `kpipe relabel --quick`'s training names the relabel command, not train flags."""
    argv = ["kpipe", "relabel", "-c", "configs/exp/b0.yaml", "--comp", "demo", "--quick"]
    text = " ".join(_stopped_hint(tmp_path, monkeypatch, argv).split("\n"))
    line = text.split("Resume with:", 1)[1]
    assert shlex.split(line) == argv, text
