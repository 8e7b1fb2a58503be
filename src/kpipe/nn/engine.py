"""The training engine: optimiser, schedule, one epoch, evaluation, checkpoints.

Everything a fold needs to stop and go on again lives in `FoldState` and in last.pt:
model, optimiser, scheduler, grad scaler, EMA, RNG states, epoch and position inside it.
Checkpoints are written atomically (temporary file + rename): a kill at any moment leaves
the previous checkpoint or the new one. On CUDA, AMP (bf16 where supported, else fp16 with
a scaler) and channels_last; on CPU, plain fp32 so a seed gives the same CV every time.

Usage: see train.py, which drives one FoldState per fold.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable
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


class NonFiniteLoss(Exception):
    """The training loss became NaN or inf at optimiser step `step` (1-based) of epoch `epoch` (0-based).

    Raised before anything is saved, so last.pt and best.pt keep the last good state.
    """

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"non-finite training loss at epoch {epoch + 1}, step {step}")
        self.epoch, self.step = epoch, step


def amp_settings(device: torch.device, t: TrainConfig) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a grad scaler is needed)."""
    if device.type != "cuda" or not t.amp:
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass(frozen=True)
class Precision:
    """How batches meet the model on this device: autocast dtype, whether a grad scaler is needed, memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    scaler: bool = False
    channels_last: bool = False

    @classmethod
    def of(cls, device: torch.device, t: TrainConfig) -> Precision:
        amp_dtype, scaler = amp_settings(device, t)
        return cls(device, amp_dtype, scaler, device.type == "cuda" and t.channels_last)

    def autocast(self) -> Any:
        return autocast(self.device, self.amp_dtype)

    def input(self, x: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        return model_input(x, self.device, prepare, self.channels_last)


@dataclass(frozen=True)
class Step:
    """Everything one training step needs besides the fold's state (FoldState)."""

    precision: Precision
    criterion: nn.Module
    prepare: Callable[[torch.Tensor], torch.Tensor] | None  # uint8 batch on the device -> model input
    n_classes: int
    mixup: Callable[..., Any] | None = None  # timm's Mixup (mixup/cutmix) or None
    label_smoothing: float = 0.0
    accum_steps: int = 1
    clip_grad: float | None = None

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input, target) on the device; with mixup, soft targets for every batch."""
        x = self.precision.input(x, self.prepare)
        y = y.to(self.precision.device, non_blocking=True)
        if self.mixup is None:
            return x, y
        if len(x) % 2 == 0:
            return self.mixup(x, y)
        # timm's Mixup pairs samples and needs an even batch; an odd one (a short last batch, an odd
        # data.batch_size) trains unmixed, with the same smoothed soft targets the loss expects.
        from timm.data.mixup import mixup_target

        return x, mixup_target(y, self.n_classes, lam=1.0, smoothing=self.label_smoothing)


@dataclass
class FoldState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # nn.optim.Schedule
    scaler: torch.amp.GradScaler
    ema: Any = None
    epoch: int = 0  # the epoch to run next (or in progress)
    step_in_epoch: int = 0  # optimiser steps done in `epoch` when interrupted mid-epoch
    # Sum of the training loss x images, and images, over those steps: a resumed epoch's mean covers all of it.
    epoch_loss_sum: float = 0.0
    epoch_seen: int = 0
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
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_seen": self.epoch_seen,
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
        # absent from a last.pt written before resume carried the epoch's partial loss
        self.epoch_loss_sum, self.epoch_seen = (
            float(ck.get("epoch_loss_sum", 0.0)),
            int(ck.get("epoch_seen", 0)),
        )
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
    st: FoldState, loader: Iterable[Any], step: Step, on_step: Callable[[int, torch.Tensor], None]
) -> tuple[float, int]:
    """One pass over `loader` (which already skips what a resumed epoch did). Returns (mean loss, images).

    on_step(images, loss) gets the step's loss as a 0-d tensor on the device: reading it (float())
    waits for the GPU to finish the step, so the loop itself never does, and the callback reads it
    only now and then (a per-step read cost 3 % of resnet50's training speed on an H100).
    """
    train_mode(st.model)  # frozen BatchNorm layers keep their running statistics
    # A resumed epoch starts from the loss of the steps done before the stop.
    total = torch.tensor(st.epoch_loss_sum, dtype=torch.float32, device=step.precision.device)
    seen, micro = st.epoch_seen, 0
    done = (total.clone(), seen)  # as of the last optimiser step: what a stop saves
    # The first optimiser step whose loss was not finite (0: none), kept on the device: checking
    # each step would wait for the GPU every step; it is read when the loop reads a loss anyway.
    first_bad = torch.zeros((), dtype=torch.long, device=step.precision.device)
    st.optimizer.zero_grad(set_to_none=True)
    try:
        for x, y, _, _ in loader:
            x, target = step.batch(x, y)
            with step.precision.autocast():
                loss = step.criterion(st.model(x), target) / step.accum_steps
            st.scaler.scale(loss).backward()
            micro += 1
            step_loss = loss.detach() * step.accum_steps
            total += step_loss * len(x)
            seen += len(x)
            n_step = st.step_in_epoch + 1
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(step_loss), n_step, first_bad)
            if micro % step.accum_steps == 0:
                _optimizer_step(st, step.clip_grad)
                done = (total.clone(), seen)
                on_step(len(x), step_loss)
                if StopRequested.signum is not None:
                    raise Interrupted(StopRequested.signum)
    except Interrupted:
        _stopped(st, first_bad, done)
        raise
    except RuntimeError as e:
        # A stop signalled to the whole process group can reach a DataLoader worker before the
        # workers ignore it (seed_worker): its death is then part of the stop, not a crash.
        if StopRequested.signum is None or "DataLoader worker" not in str(e):
            raise
        _stopped(st, first_bad, done)
        raise Interrupted(StopRequested.signum) from None
    if micro % step.accum_steps:
        _optimizer_step(st, step.clip_grad)
    _check_finite(st, first_bad)
    st.epoch_loss_sum, st.epoch_seen = 0.0, 0
    return float(total) / max(seen, 1), seen


def _stopped(st: FoldState, first_bad: torch.Tensor, done: tuple[torch.Tensor, int]) -> None:
    """Before a stop saves last.pt: no NaN weights go into it; the epoch's loss so far goes with it."""
    _check_finite(st, first_bad)
    st.epoch_loss_sum, st.epoch_seen = float(done[0]), done[1]


def _check_finite(st: FoldState, first_bad: torch.Tensor) -> None:
    bad = int(first_bad)
    if bad:
        raise NonFiniteLoss(st.epoch, bad)


def _optimizer_step(st: FoldState, clip_grad: float | None) -> None:
    if clip_grad:
        st.scaler.unscale_(st.optimizer)
        torch.nn.utils.clip_grad_norm_(st.model.parameters(), clip_grad)
    st.scaler.step(st.optimizer)
    st.scaler.update()
    st.optimizer.zero_grad(set_to_none=True)
    if st.ema is not None:
        st.ema.update(st.model)
    st.scheduler.after_step()
    st.step_in_epoch += 1


def model_input(
    x: torch.Tensor,
    device: torch.device,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None,
    channels_last: bool,
) -> torch.Tensor:
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
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
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
