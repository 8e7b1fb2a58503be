"""`kpipe sweep`: grid parsing and naming, and a tiny sweep that skips finished runs and resumes a killed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY_EXP
from kpipe import paths
from kpipe.errors import KpipeError
from kpipe.tools import sweep


def test_axes_names_and_combinations(tmp_path: Path) -> None:
    fixed, axes = sweep.split_overrides(
        ["train.folds=0,1", "model.name=resnet10t|test_resnet", "train.optimizer=sgd|adamw"]
    )
    assert fixed == ["train.folds=0,1"]
    combos = sweep.combinations(axes)
    assert combos[1] == {"model.name": "resnet10t", "train.optimizer": "adamw"} and len(combos) == 4
    assert sweep.run_name("exp", combos[0]) == "exp__model.name=resnet10t__train.optimizer=sgd"
    assert sweep.run_name("exp", {"train.folds": "[0, 1]", "x": "a/b"}) == "exp__train.folds=0_1__x=a_b"
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"train.folds": [[0, 1], [0]], "model.name": ["a"]}))
    assert sweep.read_grid(grid) == {"train.folds": ["[0, 1]", "[0]"], "model.name": ["a"]}
    with pytest.raises(KpipeError, match="bad grid axis"):
        sweep.split_overrides(["model.name=a|"])


def test_sweep_trains_skips_and_resumes(tmp_path: Path, tiny_comp: Path) -> None:
    from kpipe.config import load_config
    from kpipe.stages import folds

    exp = tmp_path / "tiny_exp.yaml"
    exp.write_text(yaml.safe_dump(TINY_EXP))
    fixed = [
        f"paths.{k}={tmp_path / k.split('_')[0]}"
        for k in ("data_root", "folds_dir", "runs_dir", "predictions_dir", "submissions_dir")
    ]
    fixed.append(f"data.cache_dir={tmp_path / 'cache'}")
    folds.run(load_config(exp, tiny_comp, fixed))
    grid = ["train.optimizer=sgd|adamw"]
    with pytest.raises(KpipeError, match="more than --max-runs 1"):
        sweep.run(str(exp), str(tiny_comp), [*fixed, *grid], max_runs=1)
    names = sweep.run(str(exp), str(tiny_comp), [*fixed, *grid])
    assert names == ["tiny_exp__train.optimizer=sgd", "tiny_exp__train.optimizer=adamw"]
    runs = [paths.RunDir(tmp_path / "runs" / n) for n in names]
    assert all(sweep.is_finished(r) for r in runs)
    assert set(json.loads(runs[0].run_json.read_text())) >= {"params_total", "fold_wall_s"}
    # A finished run is left alone; a killed one (fold 1 and cv.json lost) is resumed, fold 0 kept.
    done_cv = runs[0].cv.stat().st_mtime_ns
    fold0 = runs[1].fold(0).last.stat().st_mtime_ns
    runs[1].cv.unlink()
    for f in runs[1].fold(1).root.iterdir():
        f.unlink()
    sweep.run(str(exp), str(tiny_comp), [*fixed, *grid])
    assert runs[0].cv.stat().st_mtime_ns == done_cv
    assert runs[1].fold(0).last.stat().st_mtime_ns == fold0
    assert sweep.is_finished(runs[1]) and runs[1].fold(1).oof.is_file()


def test_a_run_on_some_folds_is_finished_once_those_folds_are(tmp_path: Path) -> None:
    """train.folds=0,1 writes a cv.json with complete=false (CV over 2 of 5 folds): still finished for the
    sweep that asked for folds 0 and 1, so re-running the sweep skips it instead of resuming it."""
    run = paths.RunDir(tmp_path / "r")
    run.root.mkdir()
    assert not sweep.is_finished(run, [0, 1])
    run.cv.write_text(json.dumps({"cv": 0.9, "per_fold": {"0": 0.9, "1": 0.9}, "complete": False}))
    assert sweep.is_finished(run, [0, 1]) and sweep.is_finished(run, [1])
    assert not sweep.is_finished(run, [0, 1, 2]) and not sweep.is_finished(run)


def test_sweep_on_several_gpus_runs_one_process_per_run(
    tmp_path: Path, tiny_comp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kpipe import cli, launch
    from kpipe.config import load_config
    from kpipe.stages import folds

    exp = tmp_path / "tiny_exp.yaml"
    exp.write_text(yaml.safe_dump(TINY_EXP))
    fixed = [
        f"paths.{k}={tmp_path / k.split('_')[0]}"
        for k in ("data_root", "folds_dir", "runs_dir", "predictions_dir", "submissions_dir")
    ]
    fixed += [f"data.cache_dir={tmp_path / 'cache'}", "train.folds=0"]
    folds.run(load_config(exp, tiny_comp, fixed))
    seen: list[tuple[list[str], int]] = []

    def in_process(jobs: list[tuple[str, list[str], Path]], gpus: int) -> list[str]:
        # What each GPU's process would run, here one after another (no GPUs on CI).
        for label, args, log in jobs:
            assert log == tmp_path / "runs" / label / "train.log" and args[-1] == "--resume"
            assert cli.main(args) == 0
        seen.extend((args, gpus) for _, args, _ in jobs)
        return []

    monkeypatch.setattr(launch, "run_per_gpu", in_process)
    names = sweep.run(str(exp), str(tiny_comp), [*fixed, "train.optimizer=sgd|adamw"], gpus=2)
    assert all(args[:5] == ["train", "-c", str(exp), "--comp", str(tiny_comp)] for args, _ in seen)
    assert len(seen) == 2 and {g for _, g in seen} == {2}
    assert all(f"name={n}" in args for n, (args, _) in zip(names, seen, strict=True))
    assert all((tmp_path / "runs" / n / "oof.csv").is_file() for n in names)


def test_run_per_gpu_queues_jobs_and_reports_failures(tmp_path: Path) -> None:
    from kpipe import launch

    jobs = [
        (f"job{i}", ["--help"] if i != 1 else ["no-such-command"], tmp_path / f"job{i}.log") for i in range(3)
    ]
    assert launch.run_per_gpu(jobs, 2) == ["job1"]
    assert (
        "usage" in (tmp_path / "job0.log").read_text()
        and "invalid choice" in (tmp_path / "job1.log").read_text()
    )
