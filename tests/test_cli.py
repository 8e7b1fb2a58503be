"""The console script: every subcommand documents itself; launchers re-run the given command line."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import path_overrides, tiny_config, write_competition
from kpipe import cli, paths
from kpipe.stages import folds

COMMANDS = [
    "demo-data",
    "demo-report",
    "audit",
    "folds",
    "train",
    "relabel",
    "infer",
    "oof-tta",
    "ensemble",
    "validate-submission",
    "kaggle",
    "submit",
    "lb",
    "bench",
    "package",
    "kernel",
]


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_describes_its_options(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: kpipe " + command in out and "options:" in out
    assert len(out.splitlines()) > 4  # a description and at least the options


@pytest.mark.slow
def test_fold_per_gpu_runs_each_fold_in_its_own_process(tmp_path: Path) -> None:
    comp = write_competition(tmp_path, n_per_class=6)
    cfg = tiny_config(tmp_path, comp)
    folds.run(cfg)
    exp = tmp_path / "tiny_exp.yaml"
    where = path_overrides(tmp_path)  # the same folders tiny_config(tmp_path, ...) uses
    code = cli.main(["train", "--fold-per-gpu", "-c", str(exp), "--comp", str(comp), *where])
    assert code == 0
    oof = pd.read_csv(paths.run_dir(cfg).root / "oof.csv", dtype={"id": str})
    assert len(oof) == 18 and oof["id"].is_unique and set(oof["fold"]) == {0, 1}
    assert (paths.run_dir(cfg).root / "fold0" / "train.log").read_text().count("fold 0 epoch 1/1") == 1


RSS_AFTER_FREE = """
import os
import numpy as np
from kpipe.cli import retain_freed_memory

applied = retain_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
block = np.ones(64 * 2**20, np.uint8)  # one 64 MB block: glibc would mmap it and unmap it on free
del block
print(applied, (rss() - before) // 2**20)
"""


@pytest.mark.skipif(
    not Path("/proc/self/statm").exists() or platform.libc_ver()[0] != "glibc", reason="Linux with glibc only"
)
@pytest.mark.parametrize("setting", ["1", "0"])
def test_freed_memory_is_kept_for_reuse_unless_opted_out(setting: str) -> None:
    env = {**os.environ, "KPIPE_KEEP_FREED_MEMORY": setting}
    out = subprocess.run(
        [sys.executable, "-c", RSS_AFTER_FREE], env=env, capture_output=True, text=True, check=True
    )
    applied, kept_mb = out.stdout.split()
    if setting == "1":
        assert (
            applied == "True" and int(kept_mb) >= 60
        )  # the freed block stays mapped, ready for the next step
    else:
        assert applied == "False" and int(kept_mb) < 8  # glibc's default: handed back at once
