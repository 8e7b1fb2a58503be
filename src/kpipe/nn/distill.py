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

from pathlib import Path

import numpy as np
import torch

from kpipe.config import load_run_config
from kpipe.data import transforms
from kpipe.errors import KpipeError
from kpipe.nn.predict import load_model, make_eval_loader, predict_models
from kpipe.paths import RunDir


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 flattens the teacher's probabilities, T = 1 keeps them."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / temperature
    e = np.exp(logp - logp.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def teacher_checkpoint(run: str, k: int) -> Path:
    """The teacher's own fold-k model: the only one that never trained on fold k's rows."""
    path = RunDir(Path(run)).fold(k).best
    if not path.is_file():
        raise KpipeError(f"train.teacher: {path} not found. Fold {k}'s student needs the teacher's own fold {k} "
                         f"model (never its OOF, which other folds' models wrote): train that fold of {run}.")
    return path


def teacher_probs(run: str, k: int, files: list[str], classes: list[str], device: torch.device, batch_size: int,
                  num_workers: int) -> tuple[np.ndarray, Path]:
    """(N, K) probabilities of the teacher's fold<k>/best.pt on `files` (eval view), and that checkpoint's path."""
    path = teacher_checkpoint(run, k)
    model, dc = load_model(path, load_run_config(run), classes)
    model = model.eval().to(device)
    loader = make_eval_loader(files, dc, batch_size, num_workers, device, tolerant=False)
    probs, _ = predict_models([model], loader, ["identity"], len(classes), device, None, False,
                              transforms.Normalize(dc["mean"], dc["std"]))
    return probs[0, 0].astype(np.float64), path


def mix(onehot: np.ndarray, teacher: np.ndarray, weight: float) -> np.ndarray:
    return (1.0 - weight) * onehot + weight * teacher
