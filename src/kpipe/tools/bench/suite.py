"""The bench run: the machine, then the data, inference, training and GPU sections, in that order.

Each section builds its cases (cases.py), times them in interleaved rounds (harness.py) and keeps
medians; `run` writes <out>/results.json and results.md (report.py) and prints the table.
Usage: ``run(Path("bench"), n_images=1000, repeats=3, quick=False)``
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from kpipe.config import DataConfig
from kpipe.console import console, safe
from kpipe.data import cache
from kpipe.io import write_json, write_text
from kpipe.nn import models
from kpipe.nn.precision import cpu_bf16
from kpipe.nn.runtime import openvino_missing
from kpipe.tools.bench.cases import (
    breakdown,
    consumer_threads,
    data_cases,
    infer_cases,
    infer_pipeline_cases,
    train_cases,
)
from kpipe.tools.bench.decode import decode_cases
from kpipe.tools.bench.harness import Plan, cpus, interleave, make_plan, summarise
from kpipe.tools.bench.images import N_CLASSES, image_set
from kpipe.tools.bench.report import GPU_TARGETS, check_targets, print_table, render_md
from kpipe.tools.bench.timm_ref import e2e_cases, e2e_workers


def machine() -> dict[str, Any]:
    import albumentations
    import PIL
    import timm
    import torchvision

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": cpus(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_bf16(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "albumentations": albumentations.__version__,
        "cv2": cv2.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def data_section(plan: Plan, out_dir: Path) -> dict[str, Any]:
    root, paths, labels = image_set(out_dir, plan)
    arr = cache.build_cache(paths, plan.img_size, out_dir / "cache" / f"{root.name}_{plan.img_size}.npy")
    # Preprocessing follows the model: the mean/std the loaders use are the benchmarked model's.
    dc = models.resolve_data_config(models.create(plan.model, N_CLASSES), DataConfig(img_size=plan.img_size))
    mean, std = dc["mean"], dc["std"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases, loaders = data_cases(plan, root, paths, labels, arr, mean, std, device)
    try:
        runs = interleave(cases, plan.repeats, "data")
    finally:
        cases.clear()
        loaders.clear()  # persistent workers end with their loaders
    out = summarise(runs, base="tutorial")
    out["consumer_threads"] = consumer_threads(plan.workers)
    out["consumer_device"] = device.type
    out["breakdown_ms_per_image"] = breakdown(plan, paths, mean, std)
    return out


def inference_section(plan: Plan, out_dir: Path) -> dict[str, Any]:
    cpu = torch.device("cpu")
    missing = openvino_missing()
    ov = missing is None
    pipeline, loader, forms = infer_pipeline_cases(plan, image_set(out_dir, plan)[1], cpu, ov)
    cases = {
        **pipeline,
        **infer_cases(
            plan.model, plan.img_size, plan.batch, plan.infer_batches, cpu, cpu_bf16(), plan.infer_compile, ov
        ),
    }
    out = summarise(interleave(cases, plan.repeats, "inference"), base="kpipe_infer")
    del cases, pipeline, loader  # its workers end with the loader
    med = {k: v["median"] for k, v in out.items() if isinstance(v, dict) and "median" in v}
    out["ratios"]["hflip_cost"] = med["kpipe_infer"] / med["kpipe_infer_hflip"]
    out["ratios"]["model_hflip_cost"] = med["fp32"] / med["fp32_hflip"]
    out["auto_precision"] = forms["kpipe_infer_auto"]  # the form kpipe_infer_auto ran in, and its agreement
    # The target: kpipe infer on the CPU, no TTA, in the fastest form kpipe offers, against fp32.
    best = max(forms, key=lambda name: med[name])
    out["ratios"]["kpipe_infer_best"] = med[best] / med["kpipe_infer"]
    out["best_form"] = {"case": best, **forms[best]}
    out["forms"] = forms
    if not ov:
        out["openvino_skipped"] = missing
    return out


def training_section(plan: Plan) -> dict[str, Any]:
    cases = train_cases(plan.model, plan.train_size, plan.batch, plan.train_steps, torch.device("cpu"), False)
    return summarise(interleave(cases, plan.repeats, "training"), base="bare")


def gpu_section(plan: Plan, device: torch.device, out_dir: Path) -> dict[str, Any]:
    """resnet50 at 224, batch 128: training fp32 vs AMP bf16 + channels_last, kpipe vs bare loop;
    inference eager vs torch.compile (synthetic batches already on the device: the model alone); then end to
    end from the bench's JPEGs, kpipe's training paths against timm's own pipeline (timm_ref.py).
    (Written for CUDA; runs on CPU too, for tests, where engine's policy keeps fp32.)"""
    tr = train_cases(plan.gpu_model, plan.gpu_size, plan.gpu_batch, plan.gpu_steps, device, fp32_too=True)
    training = summarise(interleave(tr, plan.repeats, "gpu training"))
    med = {k: v["median"] for k, v in training.items()}
    training["ratios"] = {
        "amp_bf16_channels_last_vs_fp32": med["kpipe"] / med["kpipe_fp32"],
        "kpipe_vs_bare": med["kpipe"] / med["bare"],
    }
    del tr
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_bf16()
    inf = infer_cases(
        plan.gpu_model,
        plan.gpu_size,
        plan.gpu_batch,
        max(plan.gpu_steps // 2, 1),
        device,
        bf16,
        compile_=plan.gpu_compile and bf16,
    )
    inference = summarise(interleave(inf, plan.repeats, "gpu inference"), base="fp32")
    if "bf16_channels_last_compiled" in inference:
        inference["ratios"]["compiled_vs_eager"] = (
            inference["bf16_channels_last_compiled"]["median"] / inference["bf16_channels_last"]["median"]
        )
    del inf
    if cuda:
        torch.cuda.empty_cache()
    e2e = e2e_section(plan, device, out_dir)
    decode = decode_section(plan, device, out_dir)
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    return {
        "device": name,
        "model": plan.gpu_model,
        "img_size": plan.gpu_size,
        "batch": plan.gpu_batch,
        "training": training,
        "inference": inference,
        "e2e": e2e,
        "decode": decode,
    }


def decode_section(plan: Plan, device: torch.device, out_dir: Path) -> dict[str, Any]:
    """kpipe's inference loader over the JPEGs, decoded by CPU workers vs on the GPU (infer.decode)."""
    cases = decode_cases(plan, image_set(out_dir, plan)[1], device, e2e_workers(plan))
    try:
        out = summarise(interleave(cases, plan.repeats, "gpu decode"))
    finally:
        cases.clear()  # persistent workers end with their loaders
    out["ratios"] = {
        "loader_gpu_vs_cpu_decode": out["infer_loader_gpu_decode"]["median"]
        / out["infer_loader_cpu_decode"]["median"],
        "infer_gpu_vs_cpu_decode": out["kpipe_infer_gpu_decode"]["median"]
        / out["kpipe_infer_cpu_decode"]["median"],
    }
    out["workers"] = e2e_workers(plan)
    return out


def e2e_section(plan: Plan, device: torch.device, out_dir: Path) -> dict[str, Any]:
    """End-to-end training img/s from the JPEGs: timm's pipeline vs kpipe uncached, cached, cached + batch_aug."""
    cases = e2e_cases(plan, out_dir, device)
    try:
        out = summarise(interleave(cases, plan.repeats, "gpu end-to-end training"), base="timm_train")
    finally:
        cases.clear()  # persistent workers end with their loaders
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # The target, under its own name: kpipe from the JPEGs, as timm's pipeline reads them.
    out["ratios"]["kpipe_uncached_vs_timm"] = out["ratios"]["kpipe_train_uncached"]
    out["workers"] = e2e_workers(plan)
    return out


def run(out_dir: Path, n_images: int, repeats: int, quick: bool) -> dict[str, Any]:
    """Measure, write <out>/results.json and results.md, print the table; return the results."""
    plan = make_plan(n_images, repeats, quick)
    start, load_start = time.perf_counter(), os.getloadavg()
    if load_start[0] > 0.5:
        console.print(
            f"[yellow]bench: load average {load_start[0]:.2f}: other work is running here, so the figures "
            "will be low and noisy (the ratios suffer less: cases are interleaved)."
        )
    torch.manual_seed(0)
    res: dict[str, Any] = {
        "command": _command(out_dir, n_images, repeats, quick),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "plan": asdict(plan),
    }
    res["data"] = data_section(plan, out_dir)
    res["inference"] = inference_section(plan, out_dir)
    res["training"] = training_section(plan)
    res["gpu"] = (
        gpu_section(plan, torch.device("cuda"), out_dir)
        if torch.cuda.is_available()
        else {
            "skipped": "no CUDA device here: GPU section not run, so its targets are unchecked: "
            + "; ".join(what for _, _, what in GPU_TARGETS.values())
        }
    )
    res["targets"] = check_targets(res)
    res["load_average"] = {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)}
    res["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out_dir / "results.json", res)
    write_text(out_dir / "results.md", render_md(res))
    print_table(res)
    console.print(f"bench: wrote {safe(out_dir / 'results.md')} and results.json in {res['seconds']:.0f} s")
    return res


def _command(out_dir: Path, n_images: int, repeats: int, quick: bool) -> str:
    return f"kpipe bench --out {out_dir} --images {n_images} --repeats {repeats}" + (
        " --quick" if quick else ""
    )
