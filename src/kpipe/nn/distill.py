"""Distillation targets: a teacher run's fold-k model gives soft targets to fold k's student.

Leak guard: the teacher's OOF prediction for a row of fold j came from a model that trained on fold k's
rows, so OOF-based targets would carry fold k's validation labels into fold k's student. Here fold k's
student reads only the teacher's own fold<k>/best.pt, which never trained on fold k's rows (the teacher
must have been trained on the same folds file: train.py checks folds.sha256). The teacher predicts each
training row once, on the eval view; its probabilities are softened by the temperature
(p^(1/T), renormalised) and mixed with the label: target = (1 - w) one-hot + w teacher. With
probability targets the cross-entropy is linear in the target, so that is (1 - w) CE(label) + w CE(teacher).
Usage: ``probs, path = teacher_probs("runs/big", 2, files, classes, device, 64, 2)``
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kpipe import paths
from kpipe.config import Config, load_run_config
from kpipe.data import transforms
from kpipe.errors import KpipeError
from kpipe.nn.predict import load_model, make_eval_loader, predict_models


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 flattens the teacher's probabilities, T = 1 keeps them."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / temperature
    e = np.exp(logp - logp.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def teacher_checkpoint(run: str, k: int) -> Path:
    """The teacher's own fold-k model: the only one that never trained on fold k's rows."""
    path = paths.RunDir(Path(run)).fold(k).best
    if not path.is_file():
        raise KpipeError(
            f"train.teacher: {path} not found. Fold {k}'s student needs the teacher's own fold {k} "
            f"model (never its OOF, which other folds' models wrote): train that fold of {run}."
        )
    return path


def teacher_probs(
    run: str,
    k: int,
    files: list[str],
    classes: list[str],
    device: torch.device,
    batch_size: int,
    num_workers: int,
) -> tuple[np.ndarray, Path]:
    """(N, K) probabilities of the teacher's fold<k>/best.pt on `files` (eval view), and that checkpoint's path."""
    path = teacher_checkpoint(run, k)
    model, dc = load_model(path, load_run_config(run), classes)
    model = model.eval().to(device)
    loader = make_eval_loader(files, dc, batch_size, num_workers, device, tolerant=False)
    probs, _ = predict_models(
        [model],
        loader,
        ["identity"],
        len(classes),
        device,
        None,
        False,
        transforms.Normalize(dc["mean"], dc["std"]),
    )
    return probs[0, 0].astype(np.float64), path


def mix(onehot: np.ndarray, teacher: np.ndarray, weight: float) -> np.ndarray:
    return (1.0 - weight) * onehot + weight * teacher


def fold_targets(
    cfg: Config,
    k: int,
    df: pd.DataFrame,
    classes: list[str],
    device: torch.device,
    targets: np.ndarray | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fold k's training targets: each labelled training row (never fold k's, never a pseudo row, which keeps
    its own) mixed with the teacher's fold-k softened probabilities; and what the fold records about it."""
    t, d = cfg.train, cfg.data
    if d.batch_aug or t.mixup_alpha > 0 or t.cutmix_alpha > 0:
        raise KpipeError(
            "train.teacher with data.batch_aug or mixup/cutmix: the student trains on probability "
            "targets, which those do not take. Add data.batch_aug=false train.mixup_alpha=0 "
            "train.cutmix_alpha=0."
        )
    teacher = paths.RunDir(Path(str(t.teacher)))
    here = hashlib.sha256(paths.folds_csv(cfg).read_bytes()).hexdigest()
    if not teacher.folds_sha256.is_file() or teacher.folds_sha256.read_text().strip() != here:
        raise KpipeError(
            f"train.teacher: {teacher.root} was not trained on {paths.folds_csv(cfg)} as it is now "
            "(folds.sha256 differs or is missing): its fold k model may have trained on this fold's "
            "validation rows. Use a teacher trained on these folds."
        )
    if targets is None:
        targets = np.eye(len(classes), dtype=np.float32)[df["y"].to_numpy()]
    fold = df["fold"].to_numpy()
    rows = np.flatnonzero((fold >= 0) & (fold != k))
    probs, ckpt = teacher_probs(
        str(teacher.root),
        k,
        df["path"].to_numpy()[rows].tolist(),
        classes,
        device,
        d.batch_size,
        d.num_workers,
    )
    out = targets.copy()
    out[rows] = mix(targets[rows], soften(probs, t.distill_temperature), t.distill_weight)
    record = {
        "checkpoint": str(ckpt),
        "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        "n_rows": len(rows),
        "temperature": t.distill_temperature,
        "weight": t.distill_weight,
    }
    return out, record
