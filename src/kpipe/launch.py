"""Launchers for several GPUs: `kpipe train --gpus N` under torchrun, `--fold-per-gpu`, and the queue
`run_per_gpu` that `--fold-per-gpu` and `kpipe sweep` share.

`--gpus N` re-runs the same command line under torchrun (DDP, one process per GPU); `--fold-per-gpu`
starts one `kpipe train` process per visible GPU, each pinned with CUDA_VISIBLE_DEVICES and given the
next fold, then gathers the folds' OOF as a single-process run would; `kpipe sweep` on several GPUs
trains one run per GPU the same way. Part of the interface layer: it reads the command line it re-runs.
Usage: ``kpipe train -c configs/exp/resnet50.yaml --comp demo --gpus 4``
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console, safe
from kpipe.data.folds import load_fold_table
from kpipe.stages import train


def strip_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--gpus":
            skip = True
            continue
        if a.startswith("--gpus=") or a == "--fold-per-gpu":
            continue
        out.append(a)
    return out


def torchrun(gpus: int, argv: list[str]) -> int:
    """`kpipe train --gpus N`: the same command under torchrun, N processes on this machine."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={gpus}",
        "-m",
        "kpipe",
        *strip_launch_flags(argv),
    ]
    console.print("launching: " + safe(shlex.join(cmd)), soft_wrap=True)
    return subprocess.call(cmd)


def gpu_count() -> int:
    return torch.cuda.device_count()


def run_per_gpu(jobs: list[tuple[str, list[str], Path]], gpus: int) -> list[str]:
    """Run each job (label, kpipe arguments, log file) as `python -m kpipe ARGS`, one at a time per GPU.

    Each process sees one GPU (CUDA_VISIBLE_DEVICES); a GPU takes the next job as soon as its last one
    ends. Output goes to the job's log file. Returns the labels of the jobs that failed.
    """
    queue, free = list(jobs), list(range(max(gpus, 1)))
    running: dict[int, tuple[str, subprocess.Popen, Any]] = {}
    failed: list[str] = []
    while queue or running:
        while queue and free:
            gpu, (label, args, log_path) = free.pop(0), queue.pop(0)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed when the job ends)
            running[gpu] = (
                label,
                subprocess.Popen(
                    [sys.executable, "-m", "kpipe", *args],
                    env={**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
            console.print(f"{safe(label)} started on GPU {gpu} (log: {safe(log_path)})")
        for gpu, (label, proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[gpu]
            free.append(gpu)
            if proc.returncode:
                failed.append(label)
            console.print(
                f"{safe(label)} {'failed' if proc.returncode else 'finished'} (exit {proc.returncode})"
            )
        time.sleep(0.5)
    return failed


def fold_per_gpu(cfg: Config, argv: list[str]) -> int:
    """One process per visible GPU, one fold each (CUDA_VISIBLE_DEVICES), then the usual oof.csv.

    A GPU takes the next fold as soon as its last one ends; each fold logs to fold<k>/train.log.
    A failed fold is reported with the command that re-runs it alone.
    """
    df, classes = load_fold_table(cfg)
    fold_ids = cfg.train.folds if cfg.train.folds is not None else sorted(df["fold"].unique().tolist())
    base = [a for a in argv if a != "--resume"]  # "train", then the user's options and overrides
    jobs = [
        (f"fold {k}", [*base, "--resume", f"train.folds={k}"], paths.run_dir(cfg).fold(k).log)
        for k in fold_ids
    ]
    failed = [int(label.split()[-1]) for label in run_per_gpu(jobs, gpu_count())]
    if failed:
        console.print(
            f"[red]folds {sorted(failed)} failed; see fold<k>/train.log. Re-run one alone with:[/] "
            + safe(f"kpipe {shlex.join(base)} --resume train.folds={sorted(failed)[0]}"),
            soft_wrap=True,
        )
        return 1
    train.finish_run(cfg, df, classes)
    return 0
