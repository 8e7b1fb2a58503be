"""A trained run's fold models, loaded for prediction, and the batched prediction loop over images.

`load_run` rebuilds each fold<k>/best.pt from the run's own saved config (never a download) and checks
its classes; a run folder of a `kpipe package` (fold<k>.safetensors + fold<k>.json, no pickle at all)
loads the same way through `load_package_run`; `predict_models` decodes each batch once and runs it
through every fold model with every TTA view in one forward; `sample_predictor` runs each fold model on
a few of its own fold's images under a chosen autocast dtype (nn.precision's agreement check). Used by
`kpipe infer`, `kpipe oof-tta` and the bench.
Usage: ``rm = load_run("runs/demo", classes, device); probs, ok = predict_models(rm.models, loader, ["identity"], ...)``
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from kpipe import paths
from kpipe.config import Config, load_run_config
from kpipe.data import transforms
from kpipe.data.device_decode import DeviceDecodeLoader
from kpipe.data.loader import EpochSampler, ImageDataset, make_loader
from kpipe.errors import KpipeError, preview
from kpipe.nn import models, tta
from kpipe.nn.engine import autocast, load_checkpoint, model_input


@dataclass
class RunModels:
    """One run's fold models, ready to predict, and how its inputs must be prepared."""

    run: str  # the run folder as given (also the name in ensemble JSON)
    cfg: Config  # the run's saved config
    folds: list[int]
    models: list[nn.Module]
    data_cfg: dict[str, Any]  # img_size, mean, std


def fold_of(path: Path) -> int:
    return paths.FULL_FOLD if path.parent.name == "full" else int(path.parent.name.removeprefix("fold"))


def package_folds(run: str | Path) -> list[int]:
    """The folds of a packaged run folder (fold<k>.safetensors, then full.safetensors as paths.FULL_FOLD: the order
    load_run gives a training run's), sorted; [] for a training run."""
    found = (re.fullmatch(r"fold(\d+)\.safetensors", p.name) for p in Path(run).glob("fold*.safetensors"))
    full = [paths.FULL_FOLD] if paths.package_weights(Path(run), paths.FULL_FOLD).is_file() else []
    return sorted(int(m[1]) for m in found if m) + full


def load_run(run: str, classes: list[str], device: torch.device, channels_last: bool = False) -> RunModels:
    """Every fold<k>/best.pt of a run, built from the run's own config (no download) and checked against `classes`;
    in channels_last memory format when asked (infer.channels_last: faster on CPU and GPU alike)."""
    if package_folds(run):
        return load_package_run(run, classes, device, channels_last)
    rcfg = load_run_config(run)
    ckpts = sorted(
        (p for p in Path(run).glob("fold*/best.pt") if re.fullmatch(r"fold\d+", p.parent.name)), key=fold_of
    )  # fold10 after fold9
    full = paths.RunDir(Path(run)).full.best
    ckpts += [full] if full.is_file() else []  # a full-data run (`kpipe train --full`), alone or beside folds
    if not ckpts:
        raise KpipeError(
            f"{run}: no fold<k>/best.pt or full/best.pt. Train the run first (kpipe train), "
            "or leave it out of infer.runs."
        )
    out = RunModels(run, rcfg, [], [], {})
    for path in ckpts:
        model, dc = load_model(path, rcfg, classes)
        if out.data_cfg and dc != out.data_cfg:
            raise KpipeError(
                f"{path}: preprocessing {dc} differs from fold {out.folds[0]}'s {out.data_cfg}; "
                "the folds of one run must share it. Re-train the odd fold."
            )
        model = model.eval().to(device)
        out.models.append(model.to(memory_format=torch.channels_last) if channels_last else model)
        out.folds.append(fold_of(path))
        out.data_cfg = dc
    return out


def load_model(path: Path, rcfg: Config, classes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """One best.pt built from its run's config `rcfg` (no download), checked against `classes`: (model on the
    CPU, its preprocessing)."""
    ck = load_checkpoint(path)
    if list(ck.get("classes", [])) != classes:
        raise KpipeError(
            f"{path}: trained on classes {preview(list(ck.get('classes', [])))}, but {paths.classes_json(rcfg)} "
            f"now lists {preview(classes)}. The folds were rebuilt after training (relabel?): re-train this run."
        )
    model = models.create_from_config(
        rcfg.model.model_copy(update={"pretrained": False, "weights": None}), len(classes)
    )
    model.load_state_dict(ck["model"])
    return model, data_config(ck, model, rcfg)


def load_package_run(
    run: str, classes: list[str], device: torch.device, channels_last: bool = False
) -> RunModels:
    """A packaged run: each fold<k>.safetensors into a model built from the run's config.yaml (pretrained=False),
    with its classes and preprocessing from fold<k>.json."""
    from safetensors.torch import load_file  # only packaged runs need it

    rcfg = load_run_config(run)
    mcfg = rcfg.model.model_copy(update={"pretrained": False, "weights": None})
    out = RunModels(run, rcfg, [], [], {})
    for k in package_folds(run):
        meta_path = paths.package_fold_json(Path(run), k)
        if not meta_path.is_file():
            raise KpipeError(
                f"{meta_path}: missing beside {paths.package_weights(Path(run), k).name}. "
                "The package is incomplete: write it again with `kpipe package`."
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if list(meta.get("classes", [])) != classes:
            raise KpipeError(
                f"{meta_path}: trained on classes {preview(list(meta.get('classes', [])))}, but the "
                f"package lists {preview(classes)}. Write the package again with `kpipe package`."
            )
        model = models.create_from_config(mcfg, len(classes))
        model.load_state_dict(load_file(str(paths.package_weights(Path(run), k))))
        dc = data_config(meta, model, rcfg)
        if out.data_cfg and dc != out.data_cfg:
            raise KpipeError(
                f"{meta_path}: preprocessing {dc} differs from fold {out.folds[0]}'s {out.data_cfg}."
            )
        model = model.eval().to(device)
        out.models.append(model.to(memory_format=torch.channels_last) if channels_last else model)
        out.folds.append(k)
        out.data_cfg = dc
    return out


def data_config(ck: dict[str, Any], model: nn.Module, rcfg: Config) -> dict[str, Any]:
    # Older checkpoints without data_config: resolve it the way train did.
    dc = ck.get("data_config") or models.resolve_data_config(model, rcfg.data)
    return {
        "img_size": int(dc["img_size"]),
        "mean": [float(v) for v in dc["mean"]],
        "std": [float(v) for v in dc["std"]],
    }


def make_eval_loader(
    files: list[str],
    data_cfg: dict[str, Any],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    tolerant: bool,
    decode: str = "cpu",
) -> DataLoader | DeviceDecodeLoader:
    """Batches of (uint8 NCHW, labels, indices, ok) over `files` in order. decode="gpu": the JPEGs are decoded
    on `device` (data.device_decode), the batch comes out already there; anything else is decoded by the
    workers on the CPU, with the same resize and the same handling of unreadable files."""
    ds = ImageDataset(
        files,
        None,
        transforms.build_eval(data_cfg["img_size"]),
        tolerant=tolerant,
        blank_size=data_cfg["img_size"],
    )
    if decode == "gpu":
        return DeviceDecodeLoader(ds, data_cfg["img_size"], batch_size, num_workers, device)
    sampler = EpochSampler(np.arange(len(files)), 0, shuffle=False, pad=False)
    return make_loader(ds, sampler, batch_size, num_workers, pin_memory=device.type == "cuda")


PROBE_BATCHES = 6  # timed batches per decoder when infer.decode=auto times them (after one untimed batch)


@dataclass(frozen=True)
class DecodeChoice:
    """Where inference decodes the JPEGs (infer.decode): cpu (loader workers) or gpu (the model's device)."""

    name: str  # cpu | gpu
    reason: str
    rates: dict[str, float] | None = None  # img/s of each decoder, when they were timed

    def to_json(self) -> dict[str, Any]:
        return {"decode": self.name, "reason": self.reason, "rates": self.rates}


def choose_decode(
    requested: str, device: torch.device, rates: Callable[[], dict[str, float] | None]
) -> DecodeChoice:
    """infer.decode for this device: cpu and gpu are obeyed; auto is gpu only on CUDA, and only when `rates()`
    (img/s per decoder on the first test images, None when too few to time) measures it faster."""
    if requested == "cpu":
        return DecodeChoice("cpu", "infer.decode=cpu")
    if requested == "gpu":
        where = (
            "" if device.type == "cuda" else f" (no CUDA device: torchvision decodes on the {device.type})"
        )
        return DecodeChoice("gpu", f"infer.decode=gpu, not timed{where}")
    if device.type != "cuda":
        return DecodeChoice("cpu", f"cpu: no CUDA device (inference runs on the {device.type})")
    measured = rates()
    if measured is None:
        return DecodeChoice("cpu", "cpu: too few test images to time the GPU decoder on")
    figures = (
        f"GPU {measured['gpu']:.0f} img/s, CPU workers {measured['cpu']:.0f} img/s on the first test images"
    )
    if measured["gpu"] > measured["cpu"]:
        return DecodeChoice("gpu", f"gpu: faster, {figures}", measured)
    return DecodeChoice("cpu", f"cpu: not slower, {figures}", measured)


def decode_rates(
    files: list[str], data_cfg: dict[str, Any], batch_size: int, num_workers: int, device: torch.device
) -> dict[str, float] | None:
    """img/s of each decoder (cpu, gpu) from the first files to uint8 batches on `device`; each loader's first
    batch untimed (worker start-up). None when there are too few files for two timed batches."""
    sample = files[: (PROBE_BATCHES + 1) * batch_size]
    if len(sample) < 3 * batch_size:
        return None
    # Warm the page cache for both: the first decoder timed must not pay for cold reads alone.
    for f in sample:
        with contextlib.suppress(OSError):  # an unreadable file: each loader's own rules meet it (ok=False)
            Path(f).read_bytes()
    rates = {}
    for mode in ("cpu", "gpu"):
        loader = make_eval_loader(sample, data_cfg, batch_size, num_workers, device, True, mode)
        it = iter(loader)
        next(it)[0].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        n, t0 = 0, time.perf_counter()
        for x, _, _, _ in it:
            n += len(x.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates[mode] = n / max(time.perf_counter() - t0, 1e-9)
        del it, loader  # its workers end with it
    return rates


def predict_models(
    fold_models: list[nn.Module],
    loader: DataLoader | DeviceDecodeLoader,
    views: list[str],
    n_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    on_batch: Callable[[int], None] = lambda n: None,
) -> tuple[np.ndarray, np.ndarray]:
    """(probs (F, V, N, K) float32, ok (N,)): each batch is decoded once and seen by every model, all views at once.

    `prepare` turns the loader's uint8 batch into the models' input (transforms.Normalize with the run's mean/std).
    """
    n = len(loader.dataset)
    out = np.zeros((len(fold_models), len(views), n, n_classes), np.float32)
    ok = np.ones(n, bool)
    for x, _, idx, good in loader:
        x = model_input(x, device, prepare, channels_last)
        rows = idx.numpy()
        for f, model in enumerate(fold_models):
            try:
                with autocast(device, amp_dtype):
                    probs = tta.predict_batched(model, x, views)
            except torch.cuda.OutOfMemoryError:
                raise KpipeError(
                    f"out of GPU memory: each forward is {len(views)} views x {len(x)} images. "
                    "Lower infer.batch_size or use fewer infer.tta views."
                ) from None
            out[f][:, rows] = probs.cpu().numpy()
        ok[rows] = good.numpy()
        on_batch(len(x))
    return out, ok


def sample_predictor(
    rm: RunModels,
    files_by_fold: dict[int, list[str]],
    batch_size: int,
    device: torch.device,
    channels_last: bool,
) -> Callable[..., np.ndarray]:
    """A function (dtype, models=None) -> (N, K) probabilities of each fold model on its own fold's
    `files_by_fold[k]`, no TTA, under that autocast dtype (None: fp32). `models` stand in for rm.models, fold
    for fold (another runtime's form of them: nn.runtime). The images are decoded once, here; unreadable ones
    are left out. The fp32 result of rm.models is computed once and reused (both checks compare against it)."""
    prepare = transforms.Normalize(rm.data_cfg["mean"], rm.data_cfg["std"])
    batches: list[tuple[int, torch.Tensor]] = []  # (index into the models, images)
    for i, k in enumerate(rm.folds):
        files = files_by_fold.get(k, [])
        if files:
            loader = make_eval_loader(files, rm.data_cfg, batch_size, 0, device, tolerant=True)
            batches += [(i, x[good]) for x, _, _, good in loader if bool(good.any())]
    memo: dict[str, np.ndarray] = {}

    def run(dtype: torch.dtype | None, fold_models: list[nn.Module] | None = None) -> np.ndarray:
        if dtype is None and fold_models is None and "fp32" in memo:
            return memo["fp32"]
        use = rm.models if fold_models is None else fold_models
        out = []
        for i, x in batches:
            with autocast(device, dtype):
                out.append(
                    tta.predict_batched(use[i], model_input(x, device, prepare, channels_last), ["identity"])[
                        0
                    ]
                )
        probs = torch.cat(out).float().cpu().numpy() if out else np.zeros((0, 0), np.float32)
        if dtype is None and fold_models is None:
            memo["fp32"] = probs
        return probs

    return run
