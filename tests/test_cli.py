"""The console script: every subcommand documents itself; launchers re-run the given command line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import tiny_config, write_competition
from kpipe import cli, folds

COMMANDS = ["demo-data", "demo-report", "audit", "folds", "train", "relabel", "infer", "oof-tta", "ensemble",
            "validate-submission", "kaggle", "submit", "lb", "bench"]


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_describes_its_options(command: str, capsys: pytest.CaptureFixture[str]) -> None:
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
    paths = [f"paths.{k}={v}" for k, v in cfg.paths.model_dump().items()] + [f"data.cache_dir={cfg.data.cache_dir}"]
    code = cli.main(["train", "--fold-per-gpu", "-c", str(exp), "--comp", str(comp), *paths])
    assert code == 0
    oof = pd.read_csv(cfg.run_dir / "oof.csv", dtype={"id": str})
    assert len(oof) == 18 and oof["id"].is_unique and set(oof["fold"]) == {0, 1}
    assert (cfg.run_dir / "fold0" / "train.log").read_text().count("fold 0 epoch 1/1") == 1
