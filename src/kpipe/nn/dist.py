"""Distributed helpers: the few places a DDP run differs from one process.

Under torchrun (WORLD_SIZE > 1) `setup()` joins the process group (NCCL on CUDA, gloo on CPU);
everywhere else these are no-ops, so the training loop has a single code path. Only rank 0
writes files and draws progress bars; per-sample results are gathered exactly once.

Usage: ``torchrun --nproc-per-node 4 -m kpipe train -c configs/exp/resnet50.yaml --comp demo``
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

from kpipe.errors import KpipeError


def world() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def collective_timeout() -> timedelta:
    """How long a collective waits for a missing rank before failing (KPIPE_DIST_TIMEOUT seconds, default 600):
    a rank that died or hangs then ends the run with an error instead of a silent, endless wait."""
    return timedelta(seconds=float(os.environ.get("KPIPE_DIST_TIMEOUT", "600")))


def pick_device(device_kind: str, fast_kernels: bool = True) -> torch.device:
    """This process's device for train.device=auto|cpu|cuda (under torchrun, the GPU of LOCAL_RANK).
    On CUDA, `fast_kernels` (train.cudnn_benchmark) turns on cuDNN's benchmark mode and TF32, else off."""
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise KpipeError("train.device=cuda but no CUDA device is visible. Use train.device=auto or cpu.")
    if not use_cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = fast_kernels
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast_kernels
    return device


def setup(device_kind: str, fast_kernels: bool = True) -> torch.device:
    """Join the process group when launched by torchrun; return this process's device."""
    device = pick_device(device_kind, fast_kernels)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout()
        )
    return device


def teardown(ok: bool = True) -> None:
    """Leave the process group: after a barrier when the run succeeded; at once after an error, since the
    other ranks may never reach a barrier (torchrun ends them when this process exits non-zero)."""
    if torch_dist.is_initialized():
        if ok:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank (small things: per-rank predictions)."""
    if not torch_dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank (decisions like early stopping must agree)."""
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not torch_dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return float(t.item()) / world()
