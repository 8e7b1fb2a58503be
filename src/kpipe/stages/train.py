"""`kpipe train`: train the experiment's folds one after another; keep every fold's OOF.

Writes runs/<exp>/: config.yaml, fold<k>/{best.pt,last.pt,metrics.csv,oof.csv}, oof.csv
(id, fold, label, p_<class>...), cv.json, and the reports of reports.py. `--resume`
continues each fold from last.pt (finished folds are skipped); Ctrl-C / SIGTERM save
last.pt and exit with a line saying how to resume.

Usage: ``kpipe train -c configs/exp/resnet50.yaml --comp demo train.folds=0,2``
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from kpipe import paths
from kpipe.config import Config, load_run_config
from kpipe.console import console
from kpipe.data import transforms
from kpipe.data.folds import load_fold_table
from kpipe.data.loader import CachedBatches, EpochSampler, ImageDataset, balanced_weights, make_loader
from kpipe.errors import Interrupted, KpipeError
from kpipe.eval import reports
from kpipe.eval.metrics import higher_is_better, score
from kpipe.io import read_csv_ids, write_csv, write_json, write_text, write_yaml
from kpipe.nn import dist, models
from kpipe.nn.engine import (
    FoldState,
    StopRequested,
    Throughput,
    amp_settings,
    build_optimizer,
    build_scheduler,
    load_checkpoint,
    predict,
    save_checkpoint,
    train_epoch,
    unwrap,
)

LOSS_EVERY = 20  # optimiser steps between reads of the loss for the progress bar
# Keys that may change between a run and its --resume (more epochs, other folds, other workers).
RESUMABLE_CHANGES = {"train.epochs", "train.folds", "data.num_workers", "train.early_stop_patience", "infer"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_resumable(cfg: Config) -> None:
    """Refuse to mix two different experiments in one run folder."""
    saved_path = paths.run_dir(cfg).root / "config.yaml"
    if not saved_path.is_file():
        return
    saved, now = _flat(load_run_config(paths.run_dir(cfg).root).to_dict()), _flat(cfg.to_dict())
    diff = sorted(k for k in saved.keys() | now.keys()
                  if saved.get(k) != now.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES))
    if diff:
        raise KpipeError(f"{paths.run_dir(cfg).root} was trained with a different config ({', '.join(diff[:5])}). "
                         "Use another experiment name (name=<new>) or delete the folder.")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run(cfg: Config, resume: bool = False) -> dict[str, Any]:
    device = dist.setup(cfg.train.device)
    try:
        return _run(cfg, resume, device)
    finally:
        dist.teardown()


def _run(cfg: Config, resume: bool, device: torch.device) -> dict[str, Any]:
    df, classes = load_fold_table(cfg)
    n_folds = int(df["fold"].max()) + 1
    fold_ids = cfg.train.folds if cfg.train.folds is not None else list(range(n_folds))
    bad = [k for k in fold_ids if k not in range(n_folds)]
    if bad:
        raise KpipeError(f"train.folds: {bad} not in {paths.folds_csv(cfg)} (folds 0..{n_folds - 1}).")
    if any((paths.run_dir(cfg).root / f"fold{k}" / "last.pt").is_file() for k in fold_ids) and not resume:
        raise KpipeError(f"{paths.run_dir(cfg).root} already has checkpoints. Add --resume to continue it, "
                         "or name=<new> to start another run, or delete the folder.")
    check_resumable(cfg)
    folds_hash = hashlib.sha256(paths.folds_csv(cfg).read_bytes()).hexdigest()
    saved_hash = paths.run_dir(cfg).root / "folds.sha256"
    if saved_hash.is_file() and saved_hash.read_text().strip() != folds_hash:
        raise KpipeError(f"{paths.folds_csv(cfg)} changed since {paths.run_dir(cfg).root} was trained (relabelled or re-split?): "
                         "its folds would mix two label sets. Train under a new name (name=<new>) or delete the run.")
    if dist.is_main():
        write_yaml(paths.run_dir(cfg).root / "config.yaml", cfg.to_dict())
        write_text(saved_hash, folds_hash + "\n")
    cache = _cache(cfg, df, device)
    stop_restore = StopRequested.install()
    try:
        for k in fold_ids:
            t0 = time.perf_counter()
            train_fold(cfg, k, df, classes, device, cache)
            _record(cfg, k, wall_s=time.perf_counter() - t0)
    except Interrupted as e:
        raise Interrupted(e.signum, dist.is_main()) from None
    finally:
        stop_restore()
    if not dist.is_main():
        return {}
    return finish_run(cfg, df, classes)


def _cache(cfg: Config, df: pd.DataFrame, device: torch.device) -> np.ndarray | None:
    if not cfg.data.cache:
        return None
    from kpipe.data import cache

    size = cfg.data.img_size or models.resolve_data_config(
        models.create_from_config(cfg.model.model_copy(update={"pretrained": False, "weights": None}), 2),
        cfg.data)["img_size"]
    path = paths.cache_file(cfg, size, "train")
    if dist.is_main():
        cache.build_cache(df["path"].tolist(), size, path)
    dist.barrier()
    return cache.open_cache(path, df["path"].tolist(), size)


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


def train_fold(cfg: Config, k: int, df: pd.DataFrame, classes: list[str], device: torch.device,
               cache: np.ndarray | None) -> None:
    fdir = paths.run_dir(cfg).root / f"fold{k}"
    if dist.is_main():  # temporaries of a write that a SIGKILL cut short; the real files are intact
        for stale in fdir.glob(".*.tmp"):
            stale.unlink()
    last = fdir / "last.pt"
    ck = load_checkpoint(last) if last.is_file() else None
    if ck is not None and ck["finished"] and (fdir / "oof.csv").is_file():
        if dist.is_main():
            console.print(f"fold {k}: finished earlier, skipped")
        return
    t = cfg.train
    seed_everything(t.seed + k)
    model, data_cfg = _model(cfg, len(classes), device)
    total, trainable = models.param_counts(model)
    _record(cfg, k, params_total=total, params_trainable=trainable)
    train_rows = np.flatnonzero(df["fold"].to_numpy() != k)
    val_rows = np.flatnonzero(df["fold"].to_numpy() == k)
    if dist.is_main():
        console.print(f"[bold]fold {k}[/]: {len(train_rows)} train / {len(val_rows)} val images, {cfg.model.name} "
                      f"at {data_cfg['img_size']} px, {total:,} parameters ({trainable:,} trainable), device {device}")
    size, mean, std = data_cfg["img_size"], data_cfg["mean"], data_cfg["std"]
    y, files, bs = df["y"].to_numpy(), df["path"].tolist(), cfg.data.batch_size
    weights = balanced_weights(y[train_rows], len(classes)) if cfg.data.balanced_sampling else None
    sampler = EpochSampler(train_rows, t.seed + k, weights=weights, rank=dist.rank(), world=dist.world())
    pin = device.type == "cuda"
    # Drop the last partial batch: a batch of one breaks BatchNorm, and the order reshuffles each epoch.
    drop_last = len(sampler) > bs
    # Loaders ship uint8; these turn a batch into the model's input on the device.
    normalize = transforms.Normalize(mean, std)
    if cfg.data.batch_aug:
        if cache is None:
            raise KpipeError("data.batch_aug=true needs data.cache=true: it augments whole batches of cached images.")
        # BatchAugment draws from torch's global RNG: seeded above, saved in last.pt, restored on resume.
        loader: Any = CachedBatches(cache, y, sampler, bs, drop_last, pin)
        prepare: Any = transforms.BatchAugment(cfg.data.aug, size, mean, std, hflip=cfg.data.hflip)
    else:
        tf_train = transforms.build_train(cfg.data.aug, size, hflip=cfg.data.hflip)
        tf_train.set_random_seed(t.seed + k)
        loader = make_loader(ImageDataset(files, y, tf_train, cache), sampler, bs, cfg.data.num_workers, t.seed + k,
                             pin, drop_last)
        prepare = normalize
    val_sampler = EpochSampler(val_rows, 0, shuffle=False, rank=dist.rank(), world=dist.world(), pad=False)
    if cache is not None:  # cached rows are already the eval pixels (same INTER_AREA resize), if the size matches
        if tuple(cache.shape[1:3]) != (size, size):
            raise KpipeError(f"the decode-once cache holds {cache.shape[1]} px images, the model takes {size} px: "
                             "delete the cache folder (data.cache_dir) and train again.")
        val_loader: Any = CachedBatches(cache, y, val_sampler, bs, pin_memory=pin)
    else:
        val_loader = make_loader(ImageDataset(files, y, transforms.build_eval(size)), val_sampler, bs,
                                 cfg.data.num_workers, 0, pin)

    net = model
    if dist.world() > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if t.compile:
        net = torch.compile(net)
    steps = max(len(sampler) // cfg.data.batch_size // t.accum_steps, 1)
    optimizer = build_optimizer(model, t)
    amp_dtype, need_scaler = amp_settings(device, t)
    st = FoldState(net, optimizer, build_scheduler(optimizer, t, steps),
                   torch.amp.GradScaler(device.type, enabled=need_scaler), ema=_ema(model, t))
    if ck is not None:
        st.load_state_dict(ck)
        if dist.is_main():
            console.print(f"fold {k}: resumed at epoch {st.epoch + 1}, step {st.step_in_epoch}")
    _fit(cfg, k, st, loader, sampler, val_loader, y, classes, device, amp_dtype, data_cfg, prepare, normalize)
    _write_fold_oof(cfg, k, df, classes, model, device, amp_dtype, val_loader, normalize)


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


def _criterion_and_mixup(cfg: Config, n_classes: int) -> tuple[torch.nn.Module, Any]:
    t = cfg.train
    if t.mixup_alpha > 0 or t.cutmix_alpha > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mix = Mixup(mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, label_smoothing=t.label_smoothing,
                    num_classes=n_classes)
        return SoftTargetCrossEntropy(), mix
    return torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), None


def _fit(cfg: Config, k: int, st: FoldState, loader: Any, sampler: EpochSampler, val_loader: Any, y: np.ndarray,
         classes: list[str], device: torch.device, amp_dtype: Any, data_cfg: dict[str, Any],
         prepare: Any, normalize: Any) -> None:
    t, metric = cfg.train, cfg.competition.metric
    criterion, mixup = _criterion_and_mixup(cfg, len(classes))
    model = unwrap(st.model)
    if cfg.model.freeze_until and cfg.model.unfreeze_epoch is not None and st.epoch >= cfg.model.unfreeze_epoch:
        models.set_frozen(model, cfg.model.freeze_until, False)
    with _progress() as progress:
        while st.epoch < t.epochs and not st.finished:
            epoch = st.epoch
            if cfg.model.freeze_until and cfg.model.unfreeze_epoch == epoch and st.step_in_epoch == 0:
                models.set_frozen(model, cfg.model.freeze_until, False)
                if dist.is_main():
                    console.print(f"fold {k}: unfroze the stages before {cfg.model.freeze_until} at epoch {epoch + 1}")
            sampler.set_epoch(epoch, start=st.step_in_epoch * cfg.data.batch_size * t.accum_steps)
            meter = Throughput()
            task = progress.add_task(f"fold {k} epoch {epoch + 1}/{t.epochs}", total=len(loader), loss=float("nan"))

            def on_step(n: int, loss: torch.Tensor, meter: Throughput = meter, task: Any = task) -> None:
                meter.add(n * dist.world())
                # Reading the loss waits for the GPU: the bar's loss is refreshed every LOSS_EVERY steps.
                shown = {"loss": float(loss)} if st.step_in_epoch % LOSS_EVERY == 1 else {}
                progress.update(task, advance=t.accum_steps, **shown)

            try:
                train_loss, _ = train_epoch(st, loader, device, t, amp_dtype, criterion, mixup, on_step, prepare)
            except Interrupted:
                _save_last(cfg, k, st, classes, data_cfg)
                raise
            progress.remove_task(task)
            row = _validate(cfg, st, val_loader, y, device, amp_dtype, normalize)
            row.update(epoch=epoch + 1, train_loss=train_loss, lr=st.optimizer.param_groups[0]["lr"],
                       seconds=meter.seconds, images_per_s=meter.rate)
            _end_epoch(cfg, k, st, row, classes, data_cfg, metric)
    st.finished = True
    _save_last(cfg, k, st, classes, data_cfg)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                    TimeRemainingColumn(), console=console, transient=True, disable=not dist.is_main())


def _validate(cfg: Config, st: FoldState, val_loader: Any, y: np.ndarray, device: torch.device,
              amp_dtype: Any, normalize: Any) -> dict[str, Any]:
    eval_model = st.ema.module if st.ema is not None else unwrap(st.model)
    idx, probs = gather_predictions(eval_model, val_loader, device, amp_dtype, cfg.train.channels_last, normalize)
    labels = y[idx]
    row = {"val_loss": score("log_loss", labels, probs), "val_accuracy": score("accuracy", labels, probs),
           "val_macro_f1": score("macro_f1", labels, probs)}
    row["val_score"] = row[f"val_{cfg.competition.metric}"] if cfg.competition.metric != "log_loss" else row["val_loss"]
    return row


def gather_predictions(model: torch.nn.Module, loader: Any, device: torch.device, amp_dtype: Any,
                       channels_last: bool, prepare: Any) -> tuple[np.ndarray, np.ndarray]:
    """Predictions for every sample of a sharded loader, each exactly once, on every rank."""
    cl = device.type == "cuda" and channels_last
    parts = dist.gather_objects(predict(model, loader, device, amp_dtype, cl, prepare))
    idx = np.concatenate([p[0] for p in parts])
    probs = np.concatenate([p[1] for p in parts if len(p[0])])
    order = np.argsort(idx, kind="stable")
    return idx[order], probs[order]


def _end_epoch(cfg: Config, k: int, st: FoldState, row: dict[str, Any], classes: list[str],
               data_cfg: dict[str, Any], metric: str) -> None:
    t = cfg.train
    s = row["val_score"]
    better = st.best_score is None or (s > st.best_score if higher_is_better(metric) else s < st.best_score)
    if better:
        st.best_score, st.bad_epochs = s, 0
        if dist.is_main():
            eval_model = st.ema.module if st.ema is not None else unwrap(st.model)
            save_checkpoint(paths.run_dir(cfg).root / f"fold{k}" / "best.pt",
                            _payload(cfg, eval_model.state_dict(), classes, data_cfg, row["epoch"], s))
    else:
        st.bad_epochs += 1
    st.history.append(row)
    if t.scheduler == "step":
        st.scheduler.step()
    elif t.scheduler == "plateau":
        st.scheduler.step(row["val_loss"])
    st.epoch, st.step_in_epoch = st.epoch + 1, 0
    if t.early_stop_patience is not None and st.bad_epochs >= t.early_stop_patience:
        st.finished = True
        if dist.is_main():
            console.print(f"fold {k}: early stop, no better {metric} for {st.bad_epochs} epochs")
    if dist.is_main():
        write_csv(paths.run_dir(cfg).root / f"fold{k}" / "metrics.csv", pd.DataFrame(st.history))
        console.print(f"fold {k} epoch {row['epoch']}/{t.epochs}: train loss {row['train_loss']:.4f}  "
                      f"val loss {row['val_loss']:.4f}  acc {row['val_accuracy']:.4f}  f1 {row['val_macro_f1']:.4f}"
                      f"  lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s{'  *best' if better else ''}")
    _save_last(cfg, k, st, classes, data_cfg)


def _payload(cfg: Config, state: dict[str, Any], classes: list[str], data_cfg: dict[str, Any], epoch: int,
             s: float) -> dict[str, Any]:
    return {"model": state, "classes": classes, "config": cfg.to_dict(), "data_config": data_cfg,
            "epoch": epoch, "score": s}


def _save_last(cfg: Config, k: int, st: FoldState, classes: list[str], data_cfg: dict[str, Any]) -> None:
    if dist.is_main():
        save_checkpoint(paths.run_dir(cfg).root / f"fold{k}" / "last.pt",
                        {**st.state_dict(), "classes": classes, "config": cfg.to_dict(), "data_config": data_cfg})


def _write_fold_oof(cfg: Config, k: int, df: pd.DataFrame, classes: list[str], model: torch.nn.Module,
                    device: torch.device, amp_dtype: Any, val_loader: Any, normalize: Any) -> None:
    """The fold's out-of-fold probabilities, from its best checkpoint loaded into the fold's (now done) model."""
    model.load_state_dict(load_checkpoint(paths.run_dir(cfg).root / f"fold{k}" / "best.pt")["model"])
    idx, probs = gather_predictions(model, val_loader, device, amp_dtype, cfg.train.channels_last, normalize)
    if dist.is_main():
        oof = pd.DataFrame({"id": df["id"].to_numpy()[idx], "fold": k, "label": df["label"].to_numpy()[idx]})
        oof = pd.concat([oof, pd.DataFrame(probs, columns=[f"p_{c}" for c in classes])], axis=1)
        write_csv(paths.run_dir(cfg).root / f"fold{k}" / "oof.csv", oof)
    dist.barrier()


def finish_run(cfg: Config, df: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Gather the folds' OOF into oof.csv, score it, draw the reports."""
    parts = [read_csv_ids(p) for p in sorted(paths.run_dir(cfg).root.glob("fold*/oof.csv"))]
    oof = pd.concat(parts, ignore_index=True).sort_values(["fold", "id"], kind="stable").reset_index(drop=True)
    pcols = [f"p_{c}" for c in classes]
    oof[pcols] = oof[pcols].astype(float)
    oof["fold"] = oof["fold"].astype(int)
    write_csv(paths.run_dir(cfg).root / "oof.csv", oof)
    labels = oof["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = oof[pcols].to_numpy()
    metric = cfg.competition.metric
    per_fold = {int(f): score(metric, labels[g.index], probs[g.index]) for f, g in oof.groupby("fold")}
    cv = score(metric, labels, probs)
    result = {"metric": metric, "cv": cv, "per_fold": per_fold, "n_oof": len(oof),
              "complete": len(oof) == len(df)}
    write_json(paths.run_dir(cfg).root / "cv.json", result)
    reports.write_all(paths.run_dir(cfg).root, oof, classes)
    folds_txt = "  ".join(f"fold {f}: {s:.4f}" for f, s in per_fold.items())
    console.print(f"[bold green]CV {metric} = {cv:.4f}[/] over {len(oof)} OOF rows ({folds_txt})")
    if len(oof) != len(df):
        console.print(f"[yellow]OOF covers {len(oof)} of {len(df)} train rows: train the other folds for a full CV.")
    return result
