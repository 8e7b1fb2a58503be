"""Optimisers and learning-rate schedules, one registry entry each, and the one place a schedule steps.

`build_optimizer` puts weight decay on weights only (not biases or norm parameters). `Schedule` wraps
the torch scheduler and knows when it steps: after each optimiser step (cosine with linear warmup) or
after each epoch (step, plateau on the validation loss), so the training loop calls `schedule.after_step()`
and `schedule.after_epoch(val_loss)` and never asks which kind it has.
torch is imported when an optimiser or schedule is built, so the config schema can check the names
without loading it.
Usage: ``opt = build_optimizer(model, cfg.train); sched = Schedule(opt, cfg.train, steps_per_epoch)``
"""

from __future__ import annotations

import math
from typing import Any

from kpipe.config import TrainConfig
from kpipe.registry import OPTIMIZERS, SCHEDULERS

# ------------------------------------------------------------------ optimisers: (param groups, cfg) -> optimiser


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict[str, Any]], t: TrainConfig) -> Any:
    import torch

    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)


@OPTIMIZERS.register("adam")
def adam(groups: list[dict[str, Any]], t: TrainConfig) -> Any:
    import torch

    return torch.optim.Adam(groups, lr=t.lr)


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict[str, Any]], t: TrainConfig) -> Any:
    import torch

    return torch.optim.AdamW(groups, lr=t.lr)


@OPTIMIZERS.register("nadam")
def nadam(groups: list[dict[str, Any]], t: TrainConfig) -> Any:
    import torch

    return torch.optim.NAdam(groups, lr=t.lr)


def build_optimizer(model: Any, t: TrainConfig) -> Any:
    # Frozen parameters stay in the optimiser (they get no grad, so no update) so that
    # unfreezing later needs no rebuild and resume restores one consistent state.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS.get(t.optimizer)(groups, t)


# ------------------------------------------------------------------ schedules: (optimiser, cfg, steps/epoch) -> torch scheduler


@SCHEDULERS.register("cosine", per_step=True)
def cosine(opt: Any, t: TrainConfig, steps_per_epoch: int) -> Any:
    """Linear warmup over warmup_epochs, then half a cosine to 0 at the last step."""
    import torch

    warm, total = t.warmup_epochs * steps_per_epoch, max(t.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@SCHEDULERS.register("step", per_step=False)
def step(opt: Any, t: TrainConfig, steps_per_epoch: int) -> Any:
    import torch

    return torch.optim.lr_scheduler.StepLR(opt, step_size=t.step_size, gamma=t.gamma)


@SCHEDULERS.register("plateau", per_step=False, needs_metric=True)
def plateau(opt: Any, t: TrainConfig, steps_per_epoch: int) -> Any:
    import torch

    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=t.gamma, patience=t.plateau_patience
    )


@SCHEDULERS.register("none", per_step=False)
def constant(opt: Any, t: TrainConfig, steps_per_epoch: int) -> None:
    return None


class Schedule:
    """The learning-rate schedule of one fold; the only code that steps a scheduler."""

    def __init__(self, opt: Any, t: TrainConfig, steps_per_epoch: int) -> None:
        self.scheduler = SCHEDULERS.get(t.scheduler)(opt, t, steps_per_epoch)
        meta = SCHEDULERS.meta(t.scheduler)
        self.per_step, self.needs_metric = meta["per_step"], meta.get("needs_metric", False)

    def after_step(self) -> None:
        if self.scheduler is not None and self.per_step:
            self.scheduler.step()

    def after_epoch(self, val_loss: float) -> None:
        if self.scheduler is None or self.per_step:
            return
        if self.needs_metric:
            self.scheduler.step(val_loss)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scheduler.state_dict() if self.scheduler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scheduler is not None and state is not None:
            self.scheduler.load_state_dict(state)
