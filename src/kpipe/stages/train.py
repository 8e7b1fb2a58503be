"""`kpipe train`: train the experiment's folds one after another; keep every fold's OOF.

Writes runs/<exp>/ (kpipe.paths.RunDir): config.yaml, fold<k>/{best.pt,last.pt,metrics.csv,oof.csv},
oof.csv (id, fold, label, p_<class>...), cv.json, and the reports of eval/reports.py. `--resume`
continues each fold from last.pt (finished folds are skipped); Ctrl-C / SIGTERM save last.pt and
raise Interrupted, which the CLI turns into the line that resumes the run.

A fold is built (`build_fold`: model, loaders, optimiser, schedule, state restored from last.pt),
then fitted (`fit`: epochs of train_epoch, validation, checkpoints), then its OOF is written from
best.pt. Under DDP every rank runs the same code; rank 0 alone writes files, and every rank waits at
a barrier before it reads a file rank 0 wrote.

`kpipe train --full` (`run_full`) trains one model on every usable row for the CV run's mean best epoch
(or train.full_epochs) into runs/<exp>_full/full/: no validation images, so no OOF and no CV of its own.

Usage: ``kpipe train -c configs/exp/resnet50.yaml --comp demo train.folds=0,2``
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from kpipe import paths
from kpipe.config import Config, load_run_config
from kpipe.config import validate as validate_config
from kpipe.console import console
from kpipe.data import pseudo, transforms
from kpipe.data.folds import load_fold_table
from kpipe.data.loader import (
    AugSeeds,
    CachedBatches,
    EpochSampler,
    ImageDataset,
    SoftTargets,
    balanced_weights,
    make_loader,
)
from kpipe.errors import Interrupted, KpipeError
from kpipe.eval import metrics, reports
from kpipe.eval.oof import frame, parse, write_oof
from kpipe.io import read_csv_ids, write_csv, write_json, write_text, write_yaml
from kpipe.nn import dist, distill, models
from kpipe.nn.average import WeightAverage
from kpipe.nn.engine import (
    FoldState,
    NonFiniteLoss,
    Precision,
    Step,
    StopRequested,
    Throughput,
    load_checkpoint,
    predict,
    save_checkpoint,
    train_epoch,
    unwrap,
)
from kpipe.nn.optim import Schedule, build_optimizer
from kpipe.paths import FoldDir

FULL = -1  # the fold number of the full-data fit: no row of the folds file has it, so none is held out
LOSS_EVERY = 20  # optimiser steps between reads of the loss for the progress bar
# Keys that may change between a run and its --resume (more epochs, other folds, other workers).
RESUMABLE_CHANGES = {
    "train.epochs",
    "train.folds",
    "data.num_workers",
    "train.early_stop_patience",
    "infer",
    "package",
    "kernel",
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_resumable(cfg: Config) -> None:
    """Refuse to mix two different experiments in one run folder."""
    run = paths.run_dir(cfg)
    if not run.config.is_file():
        return
    saved, now = _flat(load_run_config(run.root).to_dict()), _flat(cfg.to_dict())
    diff = sorted(
        k
        for k in saved.keys() | now.keys()
        if saved.get(k) != now.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)
    )
    if diff:
        raise KpipeError(
            f"{run.root} was trained with a different config ({', '.join(diff[:5])}). "
            "Use another experiment name (name=<new>) or delete the folder."
        )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------ the run


def run(cfg: Config, resume: bool = False) -> dict[str, Any]:
    device = dist.setup(cfg.train.device, cfg.train.cudnn_benchmark)
    ok = False
    try:
        result = _run(cfg, resume, device)
        ok = True
        return result
    finally:
        # On an error no barrier: the other ranks may never reach it. torchrun ends them when this one exits.
        dist.teardown(ok)


def _run(cfg: Config, resume: bool, device: torch.device) -> dict[str, Any]:
    df, classes = load_fold_table(cfg)
    run_dir, folds_csv = paths.run_dir(cfg), paths.folds_csv(cfg)
    n_folds = int(df["fold"].max()) + 1
    fold_ids = cfg.train.folds if cfg.train.folds is not None else list(range(n_folds))
    bad = [k for k in fold_ids if k not in range(n_folds)]
    if bad:
        raise KpipeError(f"train.folds: {bad} not in {folds_csv} (folds 0..{n_folds - 1}).")
    if any(run_dir.fold(k).last.is_file() for k in fold_ids) and not resume:
        raise KpipeError(
            f"{run_dir.root} already has checkpoints. Add --resume to continue it, "
            "or name=<new> to start another run, or delete the folder."
        )
    check_resumable(cfg)
    folds_hash = hashlib.sha256(folds_csv.read_bytes()).hexdigest()
    if run_dir.folds_sha256.is_file() and run_dir.folds_sha256.read_text().strip() != folds_hash:
        raise KpipeError(
            f"{folds_csv} changed since {run_dir.root} was trained (relabelled or re-split?): "
            "its folds would mix two label sets. Train under a new name (name=<new>) or delete the run."
        )
    if dist.is_main():
        write_yaml(run_dir.config, cfg.to_dict())
        write_text(run_dir.folds_sha256, folds_hash + "\n")
    rows, targets = add_pseudo(cfg, df, classes)
    cache = _cache(cfg, df)
    stop_restore = StopRequested.install()
    try:
        for k in fold_ids:
            t0 = time.perf_counter()
            train_fold(cfg, k, rows, classes, device, cache, targets)
            _record(cfg, k, wall_s=time.perf_counter() - t0)
    except Interrupted as e:
        raise Interrupted(e.signum, dist.is_main()) from None
    finally:
        stop_restore()
    if not dist.is_main():
        return {}
    return finish_run(cfg, df, classes)


def _cache(cfg: Config, df: pd.DataFrame) -> np.ndarray | None:
    if not cfg.data.cache:
        return None
    from kpipe.data import cache

    size = cfg.data.img_size or models.default_input_size(cfg.model)  # the model's own, without building it
    path = paths.cache_file(cfg, size, "train")
    if dist.is_main():
        cache.build_cache(df["path"].tolist(), size, path)
    dist.barrier()
    return cache.open_cache(path, df["path"].tolist(), size)


# ------------------------------------------------------------------ one fold: build, fit, OOF


@dataclass
class Fold:
    """One fold, built and ready to fit: what `fit` and the OOF pass read besides the FoldState."""

    cfg: Config
    k: int
    dir: FoldDir
    classes: list[str]
    y: np.ndarray  # class index of every row of the fold table
    data_cfg: dict[str, Any]  # img_size, mean, std: what inference must do the same way
    model: torch.nn.Module  # the plain model (checkpoints and OOF); FoldState.model may wrap it in DDP
    sampler: EpochSampler
    loader: Any  # training batches (DataLoader, or CachedBatches with data.batch_aug)
    val_loader: Any
    step: Step
    normalize: transforms.Normalize  # uint8 batch -> eval input (validation, OOF)
    average: WeightAverage | None = None  # train.swa: the last epochs' weights, averaged

    def checkpoint(self, state: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            "model": state,
            "classes": self.classes,
            "config": self.cfg.to_dict(),
            "data_config": self.data_cfg,
            **extra,
        }


def train_fold(
    cfg: Config,
    k: int,
    df: pd.DataFrame,
    classes: list[str],
    device: torch.device,
    cache: np.ndarray | None,
    targets: np.ndarray | None = None,
) -> None:
    fdir = paths.run_dir(cfg).fold(k)
    if dist.is_main():  # temporaries of a write that a SIGKILL cut short; the real files are intact
        for stale in fdir.root.glob(".*.tmp"):
            stale.unlink()
    ck = load_checkpoint(fdir.last) if fdir.last.is_file() else None
    if ck is not None and ck["finished"] and fdir.oof.is_file():
        if dist.is_main():
            console.print(f"fold {k}: finished earlier, skipped")
        return
    targets = distill_targets(cfg, k, df, classes, device, targets)
    fold, st = build_fold(cfg, k, df, classes, device, cache, ck, targets)
    fit(fold, st)
    dist.barrier()  # rank 0 has written best.pt: every rank may read it now
    choose_weights(fold, st)
    write_fold_oof(fold, df)


def build_fold(
    cfg: Config,
    k: int,
    df: pd.DataFrame,
    classes: list[str],
    device: torch.device,
    cache: np.ndarray | None,
    ck: dict[str, Any] | None,
    targets: np.ndarray | None = None,
) -> tuple[Fold, FoldState]:
    """Model, loaders, optimiser and schedule for fold k; the state restored from `ck` (last.pt) if given.
    `targets` (N, K): probability targets for the training rows (data.pseudo), else the labels' classes."""
    t, d = cfg.train, cfg.data
    seed_everything(t.seed + k)
    model, data_cfg = _model(cfg, len(classes), device)
    train_rows = np.flatnonzero(df["fold"].to_numpy() != k)
    val_rows = np.flatnonzero(df["fold"].to_numpy() == k)
    total, trainable = models.param_counts(model)
    _record(cfg, k, params_total=total, params_trainable=trainable)
    if dist.is_main():
        console.print(
            f"[bold]fold {k}[/]: {len(train_rows)} train / {len(val_rows)} val images, {cfg.model.name} "
            f"at {data_cfg['img_size']} px, {total:,} parameters ({trainable:,} trainable), device {device}"
        )
    size, mean, std = data_cfg["img_size"], data_cfg["mean"], data_cfg["std"]
    y, files, pin = df["y"].to_numpy(), df["path"].tolist(), device.type == "cuda"
    sampling = d.sampling_mode
    weights = balanced_weights(y[train_rows], len(classes)) if sampling == "weighted" else None
    resample = sampling if sampling in ("oversample", "undersample") else "none"
    sampler = EpochSampler(
        train_rows,
        t.seed + k,
        weights=weights,
        rank=dist.rank(),
        world=dist.world(),
        labels=y[train_rows],
        resample=resample,
    )
    # Drop the last partial batch: a batch of one breaks BatchNorm, and the order reshuffles each epoch.
    drop_last = len(sampler) > d.batch_size
    # Loaders ship uint8; `prepare` / `normalize` turn a batch into the model's input on the device.
    normalize = transforms.Normalize(mean, std)
    if d.batch_aug:
        if cache is None:
            raise KpipeError(
                "data.batch_aug=true needs data.cache=true: it augments whole batches of cached images."
            )
        # BatchAugment draws from torch's global RNG: seeded above, saved in last.pt, restored on resume.
        loader: Any = CachedBatches(cache, y, sampler, d.batch_size, drop_last, pin)
        prepare: Any = transforms.BatchAugment(d.aug, size, mean, std, hflip=d.hflip)
    else:
        tf_train = transforms.build_train(d.aug, size, hflip=d.hflip)
        train_ds: Any = ImageDataset(files, y, tf_train, cache)
        if targets is not None:
            train_ds = SoftTargets(train_ds, targets)
        # Each sample's augmentation seeded by (seed + fold, epoch, rank, position): a resumed epoch augments alike.
        loader = make_loader(
            train_ds, AugSeeds(sampler), d.batch_size, d.num_workers, t.seed + k, pin, drop_last
        )
        prepare = normalize
    val_sampler = EpochSampler(val_rows, 0, shuffle=False, rank=dist.rank(), world=dist.world(), pad=False)
    if (
        cache is not None
    ):  # cached rows are already the eval pixels (same INTER_AREA resize), if the size matches
        if tuple(cache.shape[1:3]) != (size, size):
            raise KpipeError(
                f"the decode-once cache holds {cache.shape[1]} px images, the model takes {size} px: "
                "delete the cache folder (data.cache_dir) and train again."
            )
        val_loader: Any = CachedBatches(cache, y, val_sampler, d.batch_size, pin_memory=pin)
    else:
        val_loader = make_loader(
            ImageDataset(files, y, transforms.build_eval(size)),
            val_sampler,
            d.batch_size,
            d.num_workers,
            0,
            pin,
        )

    precision = Precision.of(device, t)
    criterion, mixup = _criterion_and_mixup(cfg, len(classes))
    step = Step(
        precision, criterion, prepare, len(classes), mixup, t.label_smoothing, t.accum_steps, t.clip_grad
    )
    net: torch.nn.Module = model
    if dist.world() > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if t.compile:
        net = torch.compile(net)
    optimizer = build_optimizer(model, t)
    steps_per_epoch = max(len(sampler) // d.batch_size // t.accum_steps, 1)
    st = FoldState(
        net,
        optimizer,
        Schedule(optimizer, t, steps_per_epoch),
        torch.amp.GradScaler(device.type, enabled=precision.scaler),
        ema=_ema(model, t),
    )
    average = _average(model, t)
    if ck is not None:
        st.load_state_dict(ck)
        if average is not None and ck.get("average") is not None:
            average.load_state_dict(ck["average"])
        if dist.is_main():
            console.print(f"fold {k}: resumed at epoch {st.epoch + 1}, step {st.step_in_epoch}")
    fold = Fold(
        cfg,
        k,
        paths.run_dir(cfg).fold(k),
        classes,
        y,
        data_cfg,
        model,
        sampler,
        loader,
        val_loader,
        step,
        normalize,
        average,
    )
    return fold, st


def fit(fold: Fold, st: FoldState) -> None:
    """Epochs until train.epochs or an early stop: train, validate, keep the best, save last.pt every epoch."""
    cfg, k, t = fold.cfg, fold.k, fold.cfg.train
    freeze_until, unfreeze_at = cfg.model.freeze_until, cfg.model.unfreeze_epoch
    if freeze_until and unfreeze_at is not None and st.epoch > unfreeze_at:  # resumed after the unfreeze
        models.set_frozen(fold.model, freeze_until, False)
    with _progress() as progress:
        while st.epoch < t.epochs and not st.finished:
            epoch = st.epoch
            if freeze_until and unfreeze_at == epoch:
                models.set_frozen(fold.model, freeze_until, False)
                if dist.is_main() and st.step_in_epoch == 0:
                    console.print(f"fold {k}: unfroze the stages before {freeze_until} at epoch {epoch + 1}")
            fold.sampler.set_epoch(epoch, start=st.step_in_epoch * cfg.data.batch_size * t.accum_steps)
            meter = Throughput()
            bar = progress.add_task(
                f"fold {k} epoch {epoch + 1}/{t.epochs}", total=len(fold.loader), loss=float("nan")
            )

            def on_step(n: int, loss: torch.Tensor, meter: Throughput = meter, bar: Any = bar) -> None:
                meter.add(n * dist.world())
                # Reading the loss waits for the GPU: the bar's loss is refreshed every LOSS_EVERY steps.
                shown = {"loss": float(loss)} if st.step_in_epoch % LOSS_EVERY == 1 else {}
                progress.update(bar, advance=t.accum_steps, **shown)

            try:
                train_loss, _ = train_epoch(st, fold.loader, fold.step, on_step)
            except Interrupted:
                _save_last(fold, st)
                raise
            except NonFiniteLoss as e:  # nothing saved since the last good state: last.pt / best.pt keep it
                raise KpipeError(
                    f"fold {k}: the training loss became NaN or inf at epoch {e.epoch + 1}, step {e.step}; stopped "
                    f"without saving, so {fold.dir.last} keeps the last good state, if any. Lower train.lr, "
                    "set train.clip_grad, or check the images and labels, and train again (name=<new>)."
                ) from None
            progress.remove_task(bar)
            row = validate(fold, st)
            row.update(
                epoch=epoch + 1,
                train_loss=train_loss,
                lr=st.optimizer.param_groups[0]["lr"],
                seconds=meter.seconds,
                images_per_s=meter.rate,
            )
            if fold.average is not None:  # before end_epoch, whose last.pt carries the average
                fold.average.end_epoch(unwrap(st.model), epoch)
            end_epoch(fold, st, row)
    st.finished = True
    _save_last(fold, st)


def validate(fold: Fold, st: FoldState) -> dict[str, Any]:
    """val_loss (log loss, which the plateau schedule reads), val_<metric> for every registered metric, val_score."""
    eval_model = st.ema.module if st.ema is not None else unwrap(st.model)
    idx, probs = gather_predictions(eval_model, fold.val_loader, fold.step.precision, fold.normalize)
    labels = fold.y[idx]
    row = {
        ("val_loss" if m == "log_loss" else f"val_{m}"): metrics.score(m, labels, probs)
        for m in metrics.names()
    }
    metric = fold.cfg.competition.metric
    row["val_score"] = row["val_loss" if metric == "log_loss" else f"val_{metric}"]
    return row


def end_epoch(fold: Fold, st: FoldState, row: dict[str, Any]) -> None:
    """Keep the best weights, step the schedule, decide on early stopping, write metrics.csv and last.pt."""
    t, metric, k = fold.cfg.train, fold.cfg.competition.metric, fold.k
    s = row["val_score"]
    better = st.best_score is None or (
        s > st.best_score if metrics.higher_is_better(metric) else s < st.best_score
    )
    if better:
        st.best_score, st.bad_epochs = s, 0
        if dist.is_main():
            eval_model = st.ema.module if st.ema is not None else unwrap(st.model)
            save_checkpoint(
                fold.dir.best, fold.checkpoint(eval_model.state_dict(), epoch=row["epoch"], score=s)
            )
    else:
        st.bad_epochs += 1
    st.history.append(row)
    st.scheduler.after_epoch(row["val_loss"])
    st.epoch, st.step_in_epoch = st.epoch + 1, 0
    if t.early_stop_patience is not None and st.bad_epochs >= t.early_stop_patience:
        st.finished = True
        if dist.is_main():
            console.print(f"fold {k}: early stop, no better {metric} for {st.bad_epochs} epochs")
    if dist.is_main():
        write_csv(fold.dir.metrics, pd.DataFrame(st.history))
        console.print(
            f"fold {k} epoch {row['epoch']}/{t.epochs}: train loss {row['train_loss']:.4f}  "
            f"val loss {row['val_loss']:.4f}  acc {row['val_accuracy']:.4f}  f1 {row['val_macro_f1']:.4f}"
            f"  lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s{'  *best' if better else ''}"
        )
    _save_last(fold, st)


def write_fold_oof(fold: Fold, df: pd.DataFrame) -> None:
    """The fold's out-of-fold probabilities, from its best checkpoint loaded into the fold's (now done) model."""
    fold.model.load_state_dict(load_checkpoint(fold.dir.best)["model"])
    idx, probs = gather_predictions(fold.model, fold.val_loader, fold.step.precision, fold.normalize)
    if dist.is_main():
        ids, labels = df["id"].to_numpy()[idx], df["label"].to_numpy()[idx]
        write_oof(fold.dir.oof, frame(ids, fold.k, labels, probs, fold.classes))
    dist.barrier()


# ------------------------------------------------------------------ full-data fit


def best_epochs(metric: str, metrics_csvs: list[pd.DataFrame]) -> list[int]:
    """Each fold's best epoch (1-based, the first of ties) by val_score, as best.pt kept it."""
    out = []
    for m in metrics_csvs:
        scores = m["val_score"].to_numpy(np.float64)
        i = int(np.argmax(scores) if metrics.higher_is_better(metric) else np.argmin(scores))
        out.append(int(m["epoch"].iloc[i]))
    return out


def full_epochs(cfg: Config) -> tuple[int, str]:
    """(epochs, where the number came from): train.full_epochs, else the CV run's mean best epoch, rounded."""
    if cfg.train.full_epochs is not None:
        return cfg.train.full_epochs, "train.full_epochs"
    cv_run = paths.run_dir(cfg)
    found = [f for f in cv_run.fold_dirs() if f.metrics.is_file()]
    if not found:
        raise KpipeError(
            f"{cv_run.root}: no fold<k>/metrics.csv to take the epoch count from. Train the CV run "
            "first (kpipe train), or set train.full_epochs=N."
        )
    best = best_epochs(cfg.competition.metric, [pd.read_csv(f.metrics) for f in found])
    n = max(1, round(float(np.mean(best))))
    each = ", ".join(f"{f.root.name}: {b}" for f, b in zip(found, best, strict=True))
    return n, f"mean best epoch of {cv_run.root} ({each})"


def run_full(cfg: Config) -> dict[str, Any]:
    """Train on every usable row -> runs/<exp>_full/full/{best.pt,last.pt,metrics.csv}, cv.json saying no CV."""
    if cfg.train.teacher is not None:
        raise KpipeError(
            "train.teacher with --full: distillation takes fold k's targets from the teacher's fold k "
            "model, and the full-data fit has no fold. Drop train.teacher for --full."
        )
    if cfg.train.swa:
        raise KpipeError(
            "train.swa=true with --full: there are no validation images to choose between raw and "
            "averaged weights on. Add train.swa=false."
        )
    device = dist.setup(cfg.train.device, cfg.train.cudnn_benchmark)
    try:
        if dist.world() > 1:
            raise KpipeError("kpipe train --full runs in one process; drop --gpus.")
        return _run_full(cfg, device)
    finally:
        dist.teardown(True)


def _run_full(cfg: Config, device: torch.device) -> dict[str, Any]:
    df, classes = load_fold_table(cfg)
    epochs, source = full_epochs(cfg)
    rows, targets = add_pseudo(cfg, df, classes, paths.full_run_dir(cfg))
    d = cfg.to_dict()
    fcfg = validate_config(
        {**d, "name": cfg.name + paths.FULL_SUFFIX, "train": {**d["train"], "epochs": epochs}}
    )
    run = paths.full_run_dir(cfg)
    if run.full.last.is_file():
        raise KpipeError(
            f"{run.root} already has a full-data model. Delete the folder to train it again, "
            "or use another experiment name (name=<new>)."
        )
    write_yaml(run.config, fcfg.to_dict())
    write_text(run.folds_sha256, hashlib.sha256(paths.folds_csv(cfg).read_bytes()).hexdigest() + "\n")
    console.print(f"[bold]full-data fit[/]: {len(df)} images, {epochs} epochs ({source})")
    # Every row trains: fold -1 matches none of the folds file's folds, so no row is held out.
    fold, st = build_fold(fcfg, FULL, rows, classes, device, _cache(fcfg, df), None, targets)
    fold.dir = run.full
    stop_restore = StopRequested.install()
    try:
        for epoch in range(epochs):
            fold.sampler.set_epoch(epoch)
            meter = Throughput()
            train_loss, seen = train_epoch(st, fold.loader, fold.step, lambda n, loss, m=meter: m.add(n))
            st.scheduler.after_epoch(
                train_loss
            )  # no validation loss: a plateau schedule reads the training loss
            st.epoch = epoch + 1
            st.history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "images": seen,
                    "lr": st.optimizer.param_groups[0]["lr"],
                    "seconds": meter.seconds,
                }
            )
            write_csv(fold.dir.metrics, pd.DataFrame(st.history))
            console.print(f"full epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}")
            _save_last(fold, st)
    except Interrupted:
        _save_last(fold, st)
        raise
    finally:
        stop_restore()
    st.finished = True
    _save_last(fold, st)
    kept = "ema" if st.ema is not None else "raw"
    final = st.ema.module if st.ema is not None else unwrap(st.model)
    save_checkpoint(fold.dir.best, fold.checkpoint(final.state_dict(), epoch=epochs, weights=kept))
    # No "cv" key at all: `kpipe runs` / `kpipe compare` show it as missing (nan), never as a number.
    result = {
        "metric": cfg.competition.metric,
        "has_oof": False,
        "full_data": True,
        "complete": True,
        "n_train": len(df),
        "epochs": epochs,
        "epochs_from": source,
        "cv_run": str(paths.run_dir(cfg).root),
        "note": "trained on every usable row: no out-of-fold predictions, so no CV of its own; "
        "judge it by its CV run's figure and by the leaderboard",
    }
    write_json(run.cv, result)
    console.print(
        f"[bold green]full-data model[/] written to {fold.dir.best} (no CV of its own: every row trained)"
    )
    return result


# ------------------------------------------------------------------ pseudo-labels


def add_pseudo(
    cfg: Config, df: pd.DataFrame, classes: list[str], run: paths.RunDir | None = None
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The rows to train on (the fold table, plus data.pseudo's test rows in fold PSEUDO_FOLD, never a
    validation fold) and their probability targets; (df, None) without data.pseudo. Records the file used."""
    if cfg.data.pseudo is None:
        return df, None
    rows, targets, record = pseudo.training_rows(cfg, df, classes)
    if dist.is_main():
        write_json((run or paths.run_dir(cfg)).pseudo_json, record)
        console.print(
            f"data.pseudo: {record['n_rows']} pseudo-labelled test images from {record['file']} join "
            f"every fold's training rows (weight {record['weight']}); validation stays on labelled rows"
        )
    return rows, targets


# ------------------------------------------------------------------ distillation


def distill_targets(
    cfg: Config,
    k: int,
    df: pd.DataFrame,
    classes: list[str],
    device: torch.device,
    targets: np.ndarray | None,
) -> np.ndarray | None:
    """With train.teacher, fold k's training targets from the teacher's own fold-k model (kpipe.nn.distill);
    records the checkpoint in fold<k>/teacher.json."""
    if cfg.train.teacher is None:
        return targets
    out, record = distill.fold_targets(cfg, k, df, classes, device, targets)
    if dist.is_main():
        write_json(paths.run_dir(cfg).fold(k).teacher_json, record)
        console.print(
            f"fold {k}: soft targets for {record['n_rows']} training rows from {record['checkpoint']} "
            f"(T={record['temperature']:g}, weight {record['weight']:g})"
        )
    return out


# ------------------------------------------------------------------ helpers


def _model(cfg: Config, n_classes: int, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    model = models.create_from_config(cfg.model, n_classes)
    data_cfg = models.resolve_data_config(model, cfg.data)
    if cfg.train.sync_bn and dist.world() > 1:
        if device.type != "cuda":
            raise KpipeError("train.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm has no CPU kernel.")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, data_cfg


def _record(cfg: Config, k: int, wall_s: float = 0.0, **facts: int) -> None:
    """run.json for `kpipe runs`: parameter counts, and each fold's wall seconds (summed over resumes)."""
    if not dist.is_main():
        return
    path = paths.run_dir(cfg).run_json
    rec = json.loads(path.read_text()) if path.is_file() else {}
    walls = rec.setdefault("fold_wall_s", {})
    walls[str(k)] = walls.get(str(k), 0.0) + wall_s
    write_json(path, {**rec, **facts})


def _ema(model: torch.nn.Module, t: Any) -> Any:
    if not t.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=t.ema_decay)


def _average(model: torch.nn.Module, t: Any) -> WeightAverage | None:
    if not t.swa:
        return None
    if dist.world() > 1:
        raise KpipeError(
            "train.swa=true is single-process for now: each DDP rank would re-estimate BatchNorm "
            "on its own shard. Train with one process, or train.swa=false."
        )
    return WeightAverage(model, t.swa_epochs, t.epochs)


# ------------------------------------------------------------------ which weights the fold keeps


def choose_weights(fold: Fold, st: FoldState) -> None:
    """Score the candidates on the fold's validation images, keep the best in best.pt, say which in
    weights.json (and best.pt's "weights"): best.pt as the epochs left it (EMA's or the raw model's),
    with EMA also the raw model's last weights, with train.swa the averaged weights (BatchNorm re-estimated)."""
    if fold.dir.weights_json.is_file():  # chosen before (a resumed, finished fold): best.pt already holds it
        return
    metric, t = fold.cfg.competition.metric, fold.cfg.train
    best = load_checkpoint(fold.dir.best)
    kept = "ema" if st.ema is not None else "raw"
    scores = {kept: float(best["score"])}
    states: dict[str, dict[str, Any]] = {}
    if st.ema is not None:
        scores["raw"] = _score(fold, unwrap(st.model))
        states["raw"] = unwrap(st.model).state_dict()
    note = ""
    if fold.average is not None:
        if fold.average.n_averaged == 0:  # stopped early, before the averaging window
            note = f"no epoch reached the last {t.swa_epochs} of {t.epochs}: nothing averaged"
        else:
            swa = fold.average.finish(fold.step.precision.input(x, fold.normalize) for x, *_ in fold.loader)
            scores["swa"], states["swa"] = _score(fold, swa), swa.state_dict()
    sign = 1.0 if metrics.higher_is_better(metric) else -1.0
    chosen = max(scores, key=lambda name: (sign * scores[name], name == kept))  # a tie keeps best.pt as it is
    if dist.is_main():
        payload = {**best, "weights": chosen, "score": scores[chosen]}
        if chosen != kept:
            payload["model"] = states[chosen]
        save_checkpoint(fold.dir.best, payload)
        n_avg = fold.average.n_averaged if fold.average is not None else 0
        write_json(
            fold.dir.weights_json,
            {
                "chosen": chosen,
                "metric": metric,
                "val_scores": scores,
                "best_epoch": int(best["epoch"]),
                "swa_averaged": n_avg,
                "note": note,
            },
        )
        if len(scores) > 1:
            shown = "  ".join(f"{n} {v:.4f}" for n, v in scores.items())
            console.print(f"fold {fold.k}: validation {metric}: {shown} -> keeps {chosen}")
    dist.barrier()


def _score(fold: Fold, model: torch.nn.Module) -> float:
    idx, probs = gather_predictions(model, fold.val_loader, fold.step.precision, fold.normalize)
    return float(metrics.score(fold.cfg.competition.metric, fold.y[idx], probs))


def _criterion_and_mixup(cfg: Config, n_classes: int) -> tuple[torch.nn.Module, Any]:
    t = cfg.train
    if t.mixup_alpha > 0 or t.cutmix_alpha > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mix = Mixup(
            mixup_alpha=t.mixup_alpha,
            cutmix_alpha=t.cutmix_alpha,
            label_smoothing=t.label_smoothing,
            num_classes=n_classes,
        )
        return SoftTargetCrossEntropy(), mix
    return torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), None


def _save_last(fold: Fold, st: FoldState) -> None:
    if dist.is_main():
        average = {"average": fold.average.state_dict()} if fold.average is not None else {}
        save_checkpoint(
            fold.dir.last,
            {
                **st.state_dict(),
                "classes": fold.classes,
                "config": fold.cfg.to_dict(),
                "data_config": fold.data_cfg,
                **average,
            },
        )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not dist.is_main(),
    )


def gather_predictions(
    model: torch.nn.Module, loader: Any, precision: Precision, prepare: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions for every sample of a sharded loader, each exactly once, on every rank."""
    parts = dist.gather_objects(
        predict(model, loader, precision.device, precision.amp_dtype, precision.channels_last, prepare)
    )
    idx = np.concatenate([p[0] for p in parts])
    probs = np.concatenate([p[1] for p in parts if len(p[0])])
    order = np.argsort(idx, kind="stable")
    return idx[order], probs[order]


def finish_run(cfg: Config, df: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Gather the folds' OOF into oof.csv, score it, draw the reports."""
    run = paths.run_dir(cfg)
    parts = [read_csv_ids(f.oof) for f in run.fold_dirs() if f.oof.is_file()]
    table = (
        pd.concat(parts, ignore_index=True).sort_values(["fold", "id"], kind="stable").reset_index(drop=True)
    )
    oof = parse(table, str(run.oof))
    write_oof(run.oof, oof.frame())
    labels = oof.y  # oof.classes are the p_<class> columns train wrote, in `classes` order
    metric = cfg.competition.metric
    per_fold = {
        int(f): metrics.score(metric, labels[oof.folds == f], oof.probs[oof.folds == f])
        for f in np.unique(oof.folds)
    }
    cv = metrics.score(metric, labels, oof.probs)
    result = {
        "metric": metric,
        "cv": cv,
        "per_fold": per_fold,
        "n_oof": len(oof.ids),
        "complete": len(oof.ids) == len(df),
        "weights": {
            int(f.root.name[4:]): json.loads(f.weights_json.read_text())["chosen"]
            for f in run.fold_dirs()
            if f.weights_json.is_file()
        },
    }
    write_json(run.cv, result)
    reports.write_all(run.root, oof.frame(), classes)
    folds_txt = "  ".join(f"fold {f}: {s:.4f}" for f, s in per_fold.items())
    console.print(f"[bold green]CV {metric} = {cv:.4f}[/] over {len(oof.ids)} OOF rows ({folds_txt})")
    if len(oof.ids) != len(df):
        console.print(
            f"[yellow]OOF covers {len(oof.ids)} of {len(df)} train rows: train the other folds for a full CV."
        )
    return result
