"""The training engine: optimiser, schedule, one epoch, evaluation, checkpoints.

Everything a fold needs to stop and go on again lives in `FoldState` and in last.pt:
model, optimiser, scheduler, grad scaler, EMA, RNG states, epoch and position inside it.
Checkpoints are written atomically (temporary file + rename): a kill at any moment leaves
the previous checkpoint or the new one. On CUDA, AMP (bf16 where supported, else fp16 with
a scaler) and channels_last; on CPU, plain fp32 so a seed gives the same CV every time.

Usage: see train.py, which drives one FoldState per fold.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kpipe.config import TrainConfig
from kpipe.errors import Interrupted
from kpipe.io import atomic_path
from kpipe.nn import checkpoint
from kpipe.nn.models import train_mode


class StopRequested:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, saves last.pt and leaves."""

    signum: int | None = None

    @classmethod
    def install(cls) -> Callable[[], None]:
        cls.signum = None
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, _frame: Any) -> None:
            if cls.signum is not None:  # second Ctrl-C: stop waiting for the step to end
                raise KeyboardInterrupt
            cls.signum = signum

        for s in old:
            signal.signal(s, handler)
        return lambda: [signal.signal(s, h) for s, h in old.items()]  # type: ignore[func-returns-value]


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    # Frozen parameters stay in the optimiser (they get no grad, so no update) so that
    # unfreezing later needs no rebuild and resume restores one consistent state.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr)
    if t.optimizer == "nadam":
        return torch.optim.NAdam(groups, lr=t.lr)
    return torch.optim.AdamW(groups, lr=t.lr)


def build_scheduler(opt: torch.optim.Optimizer, t: TrainConfig, steps_per_epoch: int) -> Any:
    """cosine (with linear warmup) steps per optimiser step; step and plateau per epoch."""
    if t.scheduler == "cosine":
        warm, total = t.warmup_epochs * steps_per_epoch, max(t.epochs * steps_per_epoch, 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = (step - warm) / max(total - warm, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if t.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=t.step_size, gamma=t.gamma)
    if t.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=t.gamma, patience=t.plateau_patience)
    return None


def amp_settings(device: torch.device, t: TrainConfig) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a grad scaler is needed)."""
    if device.type != "cuda" or not t.amp:
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass
class FoldState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: Any = None
    epoch: int = 0  # the epoch to run next (or in progress)
    step_in_epoch: int = 0  # optimiser steps done in `epoch` when interrupted mid-epoch
    best_score: float | None = None
    bad_epochs: int = 0
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best_score": self.best_score,
            "bad_epochs": self.bad_epochs,
            "finished": self.finished,
            "history": self.history,
            "rng": checkpoint.rng_state(),  # tensors and ints: last.pt loads with weights_only=True
        }

    def load_state_dict(self, ck: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scheduler is not None and ck["scheduler"] is not None:
            self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck["ema"] is not None:
            self.ema.load_state_dict(ck["ema"])
        for k in ("epoch", "step_in_epoch", "best_score", "bad_epochs", "finished", "history"):
            setattr(self, k, ck[k])
        checkpoint.set_rng_state(ck["rng"])


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile wrappers (what checkpoints and infer load)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Tensors and plain values only (numpy turned into tensors / numbers), so load_checkpoint can refuse pickles."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint.to_plain(payload), tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read with weights_only=True: a file that would run code when unpickled is a KpipeError naming it."""
    return checkpoint.load(path)


def train_epoch(
    st: FoldState,
    loader: DataLoader,
    device: torch.device,
    t: TrainConfig,
    amp_dtype: torch.dtype | None,
    criterion: nn.Module,
    mixup: Callable[..., Any] | None,
    on_step: Callable[[int, torch.Tensor], None],
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, int]:
    """One pass over `loader` (which already skips what a resumed epoch did). Returns (mean loss, images).

    on_step(images, loss) gets the step's loss as a 0-d tensor on the device: reading it (float())
    waits for the GPU to finish the step, so the loop itself never does, and the callback reads it
    only now and then (a per-step read cost 3 % of resnet50's training speed on an H100).
    """
    train_mode(st.model)  # frozen BatchNorm layers keep their running statistics
    channels_last = device.type == "cuda" and t.channels_last
    total, seen, micro = torch.zeros((), device=device), 0, 0
    st.optimizer.zero_grad(set_to_none=True)
    for x, y, _, _ in loader:
        x = model_input(x, device, prepare, channels_last)
        y = y.to(device, non_blocking=True)
        target = y
        if mixup is not None and len(x) % 2 == 0:
            x, target = mixup(x, y)
        with autocast(device, amp_dtype):
            loss = criterion(st.model(x), target) / t.accum_steps
        st.scaler.scale(loss).backward()
        micro += 1
        step_loss = loss.detach() * t.accum_steps
        total += step_loss * len(x)
        seen += len(x)
        if micro % t.accum_steps == 0:
            _optimizer_step(st, t)
            on_step(len(x), step_loss)
            if StopRequested.signum is not None:
                raise Interrupted(StopRequested.signum)
    if micro % t.accum_steps:
        _optimizer_step(st, t)
    return float(total) / max(seen, 1), seen


def _optimizer_step(st: FoldState, t: TrainConfig) -> None:
    if t.clip_grad:
        st.scaler.unscale_(st.optimizer)
        torch.nn.utils.clip_grad_norm_(st.model.parameters(), t.clip_grad)
    st.scaler.step(st.optimizer)
    st.scaler.update()
    st.optimizer.zero_grad(set_to_none=True)
    if st.ema is not None:
        st.ema.update(st.model)
    if isinstance(st.scheduler, torch.optim.lr_scheduler.LambdaLR):
        st.scheduler.step()
    st.step_in_epoch += 1


def model_input(x: torch.Tensor, device: torch.device, prepare: Callable[[torch.Tensor], torch.Tensor] | None,
                channels_last: bool) -> torch.Tensor:
    """A loader's batch as the model's input: copied to the device as it comes (uint8: a quarter of the
    bytes of float32), then `prepare`d there (transforms.Normalize or BatchAugment)."""
    x = x.to(device, non_blocking=True)
    if prepare is not None:
        x = prepare(x)
    elif not x.is_floating_point():
        raise ValueError(f"a {x.dtype} batch needs a prepare step (transforms.Normalize) before the model")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(dataset indices, softmax probabilities) for every sample the loader yields."""
    model.eval()
    idx, probs = [], []
    for x, _, i, _ in loader:
        x = model_input(x, device, prepare, channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        probs.append(F.softmax(logits.float(), dim=1).cpu().numpy())
        idx.append(i.numpy())
    if not idx:
        return np.zeros(0, int), np.zeros((0, 0), np.float32)
    return np.concatenate(idx), np.concatenate(probs)


class Throughput:
    """Images per second over an epoch, for metrics.csv and the progress bar."""

    def __init__(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.images += n

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.images / max(self.seconds, 1e-9)
