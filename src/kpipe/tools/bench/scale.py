"""`kpipe bench --scale N`: how kpipe's cost grows with the data, stage by stage, at N and F x N images.

Photo-like 256x256 JPEGs (images.photo) are written once into <out>/scale_pool_<FN>/ (F x N train
images and F x N / 4 test images); each size's competition (class folders, a test folder and
sample_submission.csv) is made of hard links into that pool. Then `kpipe audit`, `kpipe folds`,
`kpipe cache` and a no-TTA `kpipe infer` (one random-weight fold of --scale-model, infer.precision=auto,
its agreement check on 64 images) each run as a subprocess `python -m kpipe ...`, from empty output
folders, and are timed; a stage's peak RSS is `os.wait4`'s ru_maxrss for that process (Linux counts
its reaped children, the loader workers, in it too), taken by a small launcher process (MEASURE): Linux
carries the pre-exec memory high-water mark of a forked process over exec, so a stage forked straight
from this (torch-loaded) process would report at least this process's size. Growth ratios (time at F x N over time at N;
linear is F) and the audit's peak RSS extrapolated linearly to 50,000 images are checked against
SCALE_TARGETS. Writes <out>/scale_results.json and scale_results.md.
Usage: ``run_scale(Path("bench"), 2000, 4, 224, "resnet18")``
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
import yaml
from rich.table import Table

from kpipe import paths
from kpipe.config import load_config
from kpipe.console import console, safe
from kpipe.errors import KpipeError
from kpipe.io import write_json, write_text
from kpipe.nn import models
from kpipe.nn.checkpoint import to_plain
from kpipe.tools.bench.harness import cpus
from kpipe.tools.bench.images import N_CLASSES, photo

SCALE_HW = (256, 256)
STAGES = ("audit", "folds", "cache", "infer")
RSS_AT = 50_000  # the audit memory target is stated at this many images
SCALE_TARGETS = {
    "growth": 1.125,
    "audit_rss_gb": 2.0,
}  # time ratio <= 1.125 x F (4.5 at F=4); audit RSS < 2 GB


def write_pool(out_dir: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """<out>/scale_pool_<n_train>/{train,test}/*.jpg, written once (a manifest, written last, vouches for it)."""
    pool = out_dir / f"scale_pool_{n_train}"
    spec = {"n_train": n_train, "n_test": n_test, "hw": list(SCALE_HW), "seed": seed, "quality": 90}
    manifest = pool / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text(encoding="utf-8")) == spec:
        return pool
    shutil.rmtree(pool, ignore_errors=True)
    for sub in ("train", "test"):
        (pool / sub).mkdir(parents=True)

    def write(job: tuple[str, int]) -> None:
        sub, i = job
        rgb = photo(np.random.default_rng([seed, sub == "test", i]), *SCALE_HW)
        ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise KpipeError(f"bench: OpenCV could not encode synthetic image {sub}/{i}")
        (pool / sub / f"{sub}_{i:06d}.jpg").write_bytes(buf.tobytes())

    console.print(f"bench --scale: writing {n_train} + {n_test} synthetic JPEGs to {safe(pool)} (once)")
    jobs = [("train", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]
    with ThreadPoolExecutor(max_workers=cpus()) as pool_:  # OpenCV releases the GIL
        list(pool_.map(write, jobs))
    write_json(manifest, spec)
    return pool


def make_competition(out_dir: Path, pool: Path, n: int, size: int, model: str) -> tuple[Path, Path, Path]:
    """(competition YAML, experiment YAML, work folder) for n train and n/4 test images, hard-linked from the pool."""
    root = out_dir / f"scale_{n}"
    data, work = root / "images", root / "work"
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        dst = data / "train" / f"c{i % N_CLASSES}" / f"train_{i:06d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(pool / "train" / dst.name, dst)
    test_ids = [f"test_{i:06d}" for i in range(n // 4)]
    (data / "test").mkdir(parents=True)
    for t in test_ids:
        os.link(pool / "test" / f"{t}.jpg", data / "test" / f"{t}.jpg")
    pd.DataFrame({"id": test_ids, "label": "c0"}).to_csv(data / "sample_submission.csv", index=False)
    comp = root / "comp.yaml"
    comp.write_text(yaml.safe_dump({"name": f"scale{n}", "data_dir": str(data), "layout": "folders"}))
    exp = root / "exp.yaml"
    exp.write_text(
        yaml.safe_dump(
            {
                "name": "scale",
                "model": {"name": model, "pretrained": False},
                "data": {
                    "img_size": size,
                    "batch_size": 32,
                    "num_workers": 2,
                    "cache_dir": str(work / "cache"),
                },
                "train": {"device": "cpu"},
                "folds": {"n_folds": 5},
                "infer": {"tta": ["identity"], "batch_size": 32, "precision_check_images": 64},
                "paths": {
                    k: str(work / k)
                    for k in ("data_root", "folds_dir", "runs_dir", "predictions_dir", "submissions_dir")
                },
            }
        )
    )
    return comp, exp, work


def fake_run(exp: Path, comp: Path) -> None:
    """runs/scale/: the config and one random-weight fold0/best.pt, in train's payload format (no training)."""
    cfg = load_config(exp, comp)
    classes = [f"c{k}" for k in range(N_CLASSES)]
    model = models.create_from_config(cfg.model, len(classes))
    run = paths.run_dir(cfg)
    run.fold(0).best.parent.mkdir(parents=True, exist_ok=True)
    write_text(run.config, yaml.safe_dump(cfg.to_dict()))
    payload = {
        "model": model.state_dict(),
        "classes": classes,
        "config": cfg.to_dict(),
        "epoch": 0,
        "score": 0.0,
        "data_config": models.resolve_data_config(model, cfg.data),
    }
    torch.save(to_plain(payload), run.fold(0).best)


# Run argv[2:], write [exit code, ru_maxrss in KB] of it to argv[1]: a bare interpreter forks it, not this process.
MEASURE = (
    "import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, st, ru = os.wait4(p.pid, 0); "
    "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(st), ru.ru_maxrss]))"
)


def timed(cmd: list[str], log: Path) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one subprocess; its output goes to `log`, quoted when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    usage = log.with_suffix(".rusage.json")
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", MEASURE, str(usage), *cmd], stdout=fh, stderr=subprocess.STDOUT, check=True
        )
        seconds = time.perf_counter() - t0
    code, max_rss_kb = json.loads(usage.read_text(encoding="utf-8"))
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise KpipeError(f"bench --scale: `{' '.join(cmd)}` failed (exit {code}); log {log}:\n{tail}")
    return seconds, max_rss_kb * 1024  # Linux reports kilobytes


def run_size(out_dir: Path, pool: Path, n: int, size: int, model: str) -> dict[str, dict[str, float]]:
    comp, exp, work = make_competition(out_dir, pool, n, size, model)
    counts = {"audit": n + n // 4, "folds": n, "cache": n, "infer": n // 4}
    out = {}
    for stage in STAGES:
        if stage == "infer":
            fake_run(exp, comp)
        cmd = [sys.executable, "-m", "kpipe", stage, "-c", str(exp), "--comp", str(comp)]
        seconds, rss = timed(cmd, work / "logs" / f"{stage}.log")
        out[stage] = {
            "images": counts[stage],
            "seconds": round(seconds, 2),
            "img_per_s": round(counts[stage] / seconds, 1),
            "peak_rss_mb": round(rss / 2**20, 1),
        }
        console.print(
            f"bench --scale: {n} images, {stage}: {seconds:.1f} s, peak RSS {rss / 2**20:.0f} MB", style="dim"
        )
    return out


def growth(small: dict[str, Any], large: dict[str, Any], n: int, factor: int) -> dict[str, Any]:
    """Time ratios per stage, and the audit's peak RSS extrapolated linearly (from the two sizes) to RSS_AT images."""
    ratios = {s: large[s]["seconds"] / small[s]["seconds"] for s in STAGES}
    a, b = small["audit"]["peak_rss_mb"], large["audit"]["peak_rss_mb"]
    per_image = max(b - a, 0.0) / ((factor - 1) * n)
    return {
        "time_ratio": {s: round(r, 2) for s, r in ratios.items()},
        "audit_rss_mb_at_50k": round(b + per_image * (RSS_AT - factor * n), 1),
    }


def check_scale(res: dict[str, Any]) -> list[dict[str, Any]]:
    factor, g = res["factor"], res["growth"]
    limit = SCALE_TARGETS["growth"] * factor
    out = [
        {
            "target": f"{s}: time at {factor}N / time at N",
            "value": g["time_ratio"][s],
            "goal": f"<= {limit:.2f}",
            "met": g["time_ratio"][s] <= limit,
        }
        for s in STAGES
    ]
    rss = g["audit_rss_mb_at_50k"] / 1024
    out.append(
        {
            "target": f"audit peak RSS at {RSS_AT:,} images (linear extrapolation)",
            "value": round(rss, 3),
            "goal": f"< {SCALE_TARGETS['audit_rss_gb']} GB",
            "met": rss < SCALE_TARGETS["audit_rss_gb"],
        }
    )
    return out


def run_scale(out_dir: Path, n: int, factor: int, size: int, model: str) -> dict[str, Any]:
    """Time every stage at n and factor x n images; write and print the results and targets."""
    if n < 100 or factor < 2:
        raise KpipeError(f"--scale needs N >= 100 and --scale-factor >= 2, got N={n}, F={factor}.")
    pool = write_pool(out_dir, factor * n, factor * n // 4)
    start = time.perf_counter()
    res: dict[str, Any] = {
        "command": f"kpipe bench --out {out_dir} --scale {n} --scale-factor {factor} "
        f"--scale-size {size} --scale-model {model}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "n": n,
        "factor": factor,
        "img_size": size,
        "model": model,
        "cores": cpus(),
        "load_average_start": round(os.getloadavg()[0], 2),
        "sizes": {},
    }
    for m in (n, factor * n):
        res["sizes"][str(m)] = run_size(out_dir, pool, m, size, model)
    res["growth"] = growth(res["sizes"][str(n)], res["sizes"][str(factor * n)], n, factor)
    res["targets"] = check_scale(res)
    res["load_average_end"] = round(os.getloadavg()[0], 2)
    res["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out_dir / "scale_results.json", res)
    write_text(out_dir / "scale_results.md", render_scale_md(res))
    _print(res)
    return res


def _rows(res: dict[str, Any]) -> list[tuple[str, ...]]:
    small, large = (res["sizes"][k] for k in res["sizes"])
    return [
        (
            s,
            f"{small[s]['images']:,}",
            f"{small[s]['seconds']:.1f}",
            f"{small[s]['img_per_s']:,.0f}",
            f"{small[s]['peak_rss_mb']:,.0f}",
            f"{large[s]['images']:,}",
            f"{large[s]['seconds']:.1f}",
            f"{large[s]['img_per_s']:,.0f}",
            f"{large[s]['peak_rss_mb']:,.0f}",
            f"{res['growth']['time_ratio'][s]:.2f}x",
        )
        for s in STAGES
    ]


HEADER = [
    "stage",
    "images (N)",
    "s",
    "img/s",
    "peak RSS MB",
    "images (FN)",
    "s",
    "img/s",
    "peak RSS MB",
    "time ratio",
]


def _print(res: dict[str, Any]) -> None:
    table = Table(
        title=f"kpipe bench --scale {res['n']} (x{res['factor']}), {res['model']} at {res['img_size']} px"
    )
    for col in HEADER:
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in _rows(res):
        table.add_row(*row)
    console.print(table)
    for t in res["targets"]:
        console.print(
            f"{t['target']}: {t['value']} (goal {t['goal']}) "
            + ("[green]met" if t["met"] else "[red]not met")
        )


def render_scale_md(res: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(res)]
    targets = ["| target | measured | goal | met |", "|---|---|---|---|"]
    targets += [
        f"| {t['target']} | {t['value']} | {t['goal']} | {'yes' if t['met'] else '**no**'} |"
        for t in res["targets"]
    ]
    return "\n".join(
        [
            "# kpipe bench --scale\n",
            f"`{res['command']}` on {res['date']}, {res['seconds']:.0f} s, {res['cores']} cores, load average "
            f"{res['load_average_start']} at the start, {res['load_average_end']} at the end.\n",
            f"{SCALE_HW[1]}x{SCALE_HW[0]} photo-like JPEGs; each stage a `python -m kpipe` subprocess from empty outputs; "
            "infer: one random-weight fold, no TTA, on N/4 test images; peak RSS is the process's (and its workers').\n",
            *lines,
            "",
            *targets,
            "",
        ]
    )
