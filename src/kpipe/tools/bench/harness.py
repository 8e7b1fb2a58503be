"""The bench's harness: a run's sizes (`Plan`), and timing every case in interleaved rounds.

A case is a function that runs one repetition of one measurement and returns images per second.
`interleave` runs every case once per round, rotating the order each round, so a slow minute on a
shared machine hits all cases alike; `summarise` keeps the median and min-max of the repetitions,
and ratios of medians against a section's base case.
Usage: ``runs = interleave({"a": case_a, "b": case_b}, plan.repeats, "data"); sec = summarise(runs, base="a")``
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kpipe.console import console
from kpipe.errors import KpipeError

Case = Callable[[], float]  # one repetition of one measurement -> images per second


@dataclass(frozen=True)
class Plan:
    """Sizes of one bench run; `make_plan` gives the full and the --quick ones."""

    n_images: int
    repeats: int
    quick: bool
    photo_hw: tuple[int, int] = (375, 500)
    img_size: int = 224
    batch: int = 32
    workers: int = 2
    min_seconds: float = 2.0  # each data measurement runs whole epochs until it has lasted this long
    model: str = "resnet18"
    infer_batches: int = 6
    infer_compile: bool = True  # the CPU inference rows compiled with torch.compile (about 25 s per model)
    train_size: int = 224
    train_steps: int = 6
    gpu_model: str = "resnet50"
    gpu_size: int = 224
    gpu_batch: int = 128
    gpu_steps: int = 50  # per repetition: 20 left the kpipe/bare ratio within ±4 % noise on an H100
    gpu_compile: bool = True
    # End to end (JPEGs -> loader -> step, kpipe vs timm's pipeline): steps per repetition, rounded up to
    # whole epochs of the image set; loader workers per case (-1: every core but one).
    gpu_e2e_steps: int = 40
    gpu_workers: int = -1


def make_plan(n_images: int, repeats: int, quick: bool) -> Plan:
    if repeats < 1:
        raise KpipeError(f"--repeats must be at least 1, got {repeats}.")
    if quick:
        plan = Plan(
            min(n_images, 64),
            repeats,
            True,
            photo_hw=(120, 160),
            img_size=64,
            batch=16,
            min_seconds=0.0,
            infer_batches=1,
            infer_compile=False,
            train_size=64,
            train_steps=2,
            gpu_model="resnet18",
            gpu_size=64,
            gpu_batch=32,
            gpu_steps=3,
            gpu_compile=False,
            gpu_e2e_steps=2,
            gpu_workers=2,
        )
    else:
        plan = Plan(n_images, repeats, False)
    if plan.n_images < 2 * plan.batch:
        raise KpipeError(f"--images must be at least {2 * plan.batch} (two batches), got {n_images}.")
    return plan


def interleave(cases: dict[str, Case], repeats: int, title: str) -> dict[str, list[float]]:
    """Run every case once per round, `repeats` rounds, rotating the order each round."""
    names = list(cases)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            runs[name].append(cases[name]())
        console.print(f"bench: {title} round {r + 1}/{repeats} done", style="dim")
    return runs


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": [round(v, 2) for v in values],
    }


def summarise(runs: dict[str, list[float]], base: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {name: summary(v) for name, v in runs.items()}
    if base is not None:
        out["ratios"] = {name: out[name]["median"] / out[base]["median"] for name in runs if name != base}
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpus() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
