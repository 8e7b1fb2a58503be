"""Weight averaging (SWA): the end-of-epoch weights of the last epochs, averaged, BatchNorm re-estimated.

Averaging the weights that the last epochs ended on lands nearer the centre of a wide optimum than any one of
them (Izmailov et al., 2018). The running BatchNorm statistics of an average of weights belong to none of the
averaged models, so they are re-estimated with one pass over the training batches (torch's `update_bn`);
without it the averaged model reads its inputs with the first epoch's statistics. This sits next to EMA
(kpipe.config train.ema, updated every step): train.py scores raw / EMA / averaged weights on the fold's
validation images and keeps the best.
Usage: ``avg = WeightAverage(model, last=3, epochs=10); avg.end_epoch(model, epoch); avg.finish(batches)``
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn


class WeightAverage:
    """Equal-weight average of the weights at the end of epochs `epochs - last` .. `epochs - 1` (0-based)."""

    def __init__(self, model: nn.Module, last: int, epochs: int) -> None:
        self.averaged = AveragedModel(model)
        self.first = max(epochs - last, 0)

    @property
    def n_averaged(self) -> int:
        return int(self.averaged.n_averaged)

    def end_epoch(self, model: nn.Module, epoch: int) -> None:
        """Fold `model`'s weights into the average if 0-based `epoch` is one of the last ones."""
        if epoch >= self.first:
            self.averaged.update_parameters(model)

    def finish(self, batches: Iterable[torch.Tensor]) -> nn.Module:
        """Re-estimate BatchNorm running statistics over `batches` (model inputs on the device); the averaged
        plain model, in eval mode."""
        update_bn(batches, self.averaged)
        self.averaged.eval()
        return self.averaged.module

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
