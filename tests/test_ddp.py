"""DDP under torchrun on CPU (gloo, 2 processes): every train id once in OOF, the same CV as one
process, only rank 0 writes, and the checkpoint loads in single-process inference.

The model is test_convnext (LayerNorm, no BatchNorm): with BatchNorm each rank normalises its own
half-batch, and PyTorch's SyncBatchNorm has no CPU kernel, so results would differ by design.
Same seed and same effective batch (2 ranks x 2 = 1 process x 4) give the same samples per step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TINY_EXP, path_overrides, tiny_config, write_competition
from kpipe import paths
from kpipe.stages import folds, infer, train

pytestmark = pytest.mark.slow

EXP = {
    **TINY_EXP,
    "model": {"name": "test_convnext", "pretrained": False},
    "data": {**TINY_EXP["data"], "aug": "none"},
    "train": {**TINY_EXP["train"], "epochs": 2},
}


def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    comp = write_competition(tmp_path, n_per_class=6)
    single = tiny_config(tmp_path, comp, ["name=single", "data.batch_size=4"], exp=EXP)
    folds.run(single)
    ref = train.run(single)

    exp_path = tmp_path / "ddp.yaml"
    exp_path.write_text(yaml.safe_dump(EXP))
    overrides = path_overrides(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "kpipe",
        "train",
        "-c",
        str(exp_path),
        "--comp",
        str(comp),
        "name=ddp",
        "data.batch_size=2",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Only rank 0 prints (io.atomic_path would have raised on any other rank's write).
    assert proc.stdout.count("fold 0 epoch 2/2") == 1

    run_dir = tmp_path / "runs" / "ddp"
    oof = pd.read_csv(run_dir / "oof.csv", dtype={"id": str})
    train_ids = pd.read_csv(paths.folds_csv(single), dtype=str)["id"]
    assert oof["id"].is_unique and set(oof["id"]) == set(train_ids)
    ref_oof = pd.read_csv(paths.run_dir(single).root / "oof.csv", dtype={"id": str})
    pcols = [c for c in oof.columns if c.startswith("p_")]
    # Tolerance: float reduction order differs (gradients all-reduced over 2 ranks), nothing else.
    np.testing.assert_allclose(oof[pcols].to_numpy(), ref_oof[pcols].to_numpy(), atol=1e-4)
    cv = yaml.safe_load((run_dir / "cv.json").read_text())["cv"]
    assert abs(cv - ref["cv"]) < 1e-9

    ddp_cfg = tiny_config(tmp_path, comp, ["name=ddp", "data.batch_size=2"], exp=EXP)
    result = infer.run(ddp_cfg)  # checkpoints written under DDP load in one process
    sub = pd.read_csv(Path(ddp_cfg.paths.submissions_dir) / "ddp.csv", dtype=str)
    assert len(sub) == 6 and result is not None


def _torchrun(tmp_path: Path, fault: str, extra: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Fold 0 of a 1-epoch run under torchrun (2 processes, gloo) with a fault planted by tests/ddp_entry.py."""
    comp = write_competition(tmp_path, n_per_class=6)
    cfg = tiny_config(tmp_path, comp, exp=EXP)
    folds.run(cfg)
    exp_path = tmp_path / "ddp.yaml"
    exp_path.write_text(yaml.safe_dump(EXP))
    where = path_overrides(tmp_path)  # the same folders tiny_config(tmp_path, ...) uses
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(Path(__file__).parent / "ddp_entry.py"),
        "train",
        "-c",
        str(exp_path),
        "--comp",
        str(comp),
        "name=ddp",
        "train.folds=0",
        "train.epochs=1",
        "data.batch_size=2",
        *where,
        *extra,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "KPIPE_TEST_FAULT": fault,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
    }
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    return proc, time.monotonic() - start


def test_ranks_wait_for_rank0s_checkpoint_before_reading_it(tmp_path: Path) -> None:
    """Rank 0 writes best.pt slowly; rank 1 must not read it before it exists (it used to, then hung)."""
    proc, _ = _torchrun(tmp_path, "slow_checkpoint", [])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    oof = pd.read_csv(tmp_path / "runs" / "ddp" / "fold0" / "oof.csv", dtype={"id": str})
    val = pd.read_csv(tmp_path / "folds" / "tiny.csv", dtype={"id": str}).query("fold == 0")["id"]
    assert oof["id"].is_unique and sorted(oof["id"]) == sorted(val)


def test_an_error_on_one_rank_ends_every_rank_with_its_message(tmp_path: Path) -> None:
    proc, seconds = _torchrun(tmp_path, "raise_on_rank1", [])
    assert proc.returncode != 0
    assert "planted failure on rank 1" in proc.stdout + proc.stderr
    assert seconds < 60, f"the run took {seconds:.0f} s to end after rank 1 failed"
