"""Checkpoints that hold data, not code: what kpipe writes to, and reads from, best.pt / last.pt.

A .pt file is a pickle, and unpickling may call any function the file names: a `best.pt` shared in
a Kaggle dataset could run code on the machine that loads it. So kpipe writes only tensors and plain
Python values (dict, list, tuple, str, int, float, bool, None) and reads every file with
`torch.load(weights_only=True)`, which refuses anything else. Random-number states, which numpy
and Python hand out as arrays and tuples, are stored as a tensor and ints and turned back on load.

Usage: ``torch.save(to_plain(payload), tmp)``; ``ck = load(path)``; ``set_rng_state(ck["rng"])``
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from kpipe.errors import KpipeError

_PASS_THROUGH = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """`obj` with numpy values turned into tensors / Python numbers and paths into str, so that
    `torch.load(weights_only=True)` can read it back. Anything else is a bug in the caller: TypeError."""
    if isinstance(obj, np.generic):  # before the float/int check: np.float64 is a float subclass
        return obj.item()
    if isinstance(obj, _PASS_THROUGH):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where}: a {type(obj).__name__} cannot go into a checkpoint; store plain data instead")


def rng_state() -> dict[str, Any]:
    """torch, numpy and Python global RNG states as tensors and ints."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [int(version), [int(v) for v in internal], gauss_next],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["bit_generator"],
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's payload, read with weights_only=True: a file holding anything but tensors and
    plain values is refused (KpipeError naming it), never unpickled."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the callable or class the pickle names
        if found is None:  # not a pickle object we refuse, just bytes torch cannot parse
            raise KpipeError(
                f"{path}: not a readable checkpoint (damaged or not a PyTorch file). "
                "Train the run again (kpipe train)."
            ) from None
        older = (
            " It looks like a checkpoint from a kpipe before this check (numpy values pickled): train the run "
            "again (kpipe train) to write it in the safe format."
            if found[1].startswith("numpy.")
            else " If you trained it yourself with an older kpipe, train the run again (kpipe train); if it came "
            "from someone else, ask for a file of tensors and plain values (or .safetensors for weights)."
        )
        raise KpipeError(
            f"{path}: refused: it holds a Python object ({found[1]}), not only tensors and plain values, and "
            f"loading it could run code, so kpipe does not load it.{older}"
        ) from None
    except FileNotFoundError:
        raise KpipeError(f"{path}: file not found.") from None
    # A damaged file fails in torch.load with many exception types (RuntimeError, EOFError, KeyError, ...);
    # all mean the same to the user, and the cause is chained.
    except Exception as e:
        raise KpipeError(
            f"{path}: not a readable checkpoint (damaged or not a PyTorch file: "
            f"{type(e).__name__}: {e}). Train the run again (kpipe train)."
        ) from e
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise KpipeError(
            f"{path}: not a kpipe checkpoint (expected a dict with the model's state under 'model'). "
            "Train the run again (kpipe train)."
        )
    return obj
