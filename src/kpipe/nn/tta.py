"""Test-time augmentation on whole batches: every view of a batch goes through the model in one forward.

A view is a deterministic transform of a normalised float batch (B, C, H, W) that keeps its shape,
so all views stack into one (V*B, C, H, W) tensor, view-major (rows [v*B:(v+1)*B] are view v):

- ``identity``, ``hflip`` (left-right), ``vflip`` (top-bottom);
- ``rot90``, ``rot180``, ``rot270``: counter-clockwise quarter turns (``torch.rot90``); square inputs only;
- ``scale<F>`` (e.g. ``scale1.15``, ``scale0.9``): resize by F (bilinear; anti-aliased when shrinking),
  then centre-crop (F > 1) or pad (F < 1) back to H x W by repeating the edge pixels, so the border
  continues the background (a constant fill draws a frame the model never saw in training);
- ``fivecrop`` / ``fivecrop<F>`` (default F = 0.875): the four corner crops and the centre crop of
  side F*H x F*W, each resized back to H x W; it expands to five views named ``<name>_tl``, ``_tr``,
  ``_bl``, ``_br``, ``_c``, and each of those names may also be listed alone.

Usage: ``probs = predict_batched(model.eval(), x, ["identity", "hflip"]); p = aggregate(probs, "mean")``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kpipe.errors import KpipeError
from kpipe.registry import TTA_VIEWS

VIEWS: tuple[str, ...] = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270", "scale<F>", "fivecrop")
FIVECROP_DEFAULT = 0.875
CROP_POSITIONS: tuple[str, ...] = ("tl", "tr", "bl", "br", "c")
_NUM = r"(\d+(?:\.\d+)?|\.\d+)"
_SCALE_RE = re.compile(rf"scale{_NUM}")
_FIVECROP_RE = re.compile(rf"fivecrop{_NUM}?(?:_(tl|tr|bl|br|c))?")
# Examples offered when a name is misspelt.
_EXAMPLES = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270", "scale1.15", "scale0.9", "fivecrop")

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


def _bad_view(name: str, why: str = "unknown TTA view") -> KpipeError:
    close = difflib.get_close_matches(name.lower(), _EXAMPLES, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return KpipeError(
        f"infer.tta: {why} '{name}'{hint}. Views: identity, hflip, vflip, rot90, rot180, rot270, "
        "scale<F> (e.g. scale1.15), fivecrop or fivecrop<F> (e.g. fivecrop0.8)."
    )


def _fixed(name: str) -> bool:
    """A registered view without a parameter."""
    return name in TTA_VIEWS.names() and not TTA_VIEWS.meta(name).get("family")


def _check_view(name: str) -> None:
    if _fixed(name):
        return
    m = _SCALE_RE.fullmatch(name)
    if m:
        if not 0 < float(m.group(1)) <= 4:
            raise _bad_view(name, "scale factor must be in (0, 4] in view")
        return
    m = _FIVECROP_RE.fullmatch(name)
    if m:
        if m.group(1) is not None and not 0 < float(m.group(1)) <= 1:
            raise _bad_view(name, "fivecrop fraction must be in (0, 1] in view")
        return
    raise _bad_view(name)


def parse_views(names: list[str] | tuple[str, ...]) -> list[str]:
    """Validate view names and expand each ``fivecrop`` into its five crops; raise KpipeError on a bad name."""
    if isinstance(names, str):  # a bare string would be iterated letter by letter
        names = [names]
    if not names:
        raise KpipeError("infer.tta: no views given; use at least ['identity'].")
    out: list[str] = []
    for name in names:
        _check_view(name)
        m = _FIVECROP_RE.fullmatch(name)
        if m and m.group(2) is None:
            out.extend(f"{name}_{pos}" for pos in CROP_POSITIONS)
        else:
            out.append(name)
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise KpipeError(f"infer.tta: view(s) listed twice: {', '.join(dup)}. List each view once.")
    return out


def _need_square(x: Tensor, view: str) -> None:
    h, w = x.shape[-2:]
    if h != w:
        raise KpipeError(
            f"TTA view '{view}' needs square images, got {h}x{w}: a quarter turn would change the shape. "
            "Drop rot90/rot270 from infer.tta or use a square data.img_size."
        )


def _fit_center(x: Tensor, h: int, w: int) -> Tensor:
    """Centre-crop or edge-pad the last two dims of x to h x w."""
    dh, dw = x.shape[-2] - h, x.shape[-1] - w
    if dh > 0 or dw > 0:  # crop (a view never grows one side and shrinks the other)
        top, left = max(dh, 0) // 2, max(dw, 0) // 2
        x = x[..., top : top + min(h, x.shape[-2]), left : left + min(w, x.shape[-1])]
        dh, dw = x.shape[-2] - h, x.shape[-1] - w
    if dh < 0 or dw < 0:
        ph, pw = -dh, -dw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
    return x


def _scale(x: Tensor, factor: float) -> Tensor:
    h, w = x.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    if size == (h, w):
        return x
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=factor < 1)
    return _fit_center(y, h, w)


def _crop(x: Tensor, frac: float, pos: str) -> Tensor:
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
    top = {"tl": 0, "tr": 0, "bl": h - ch, "br": h - ch, "c": (h - ch) // 2}[pos]
    left = {"tl": 0, "tr": w - cw, "bl": 0, "br": w - cw, "c": (w - cw) // 2}[pos]
    crop = x[..., top : top + ch, left : left + cw]
    if (ch, cw) == (h, w):
        return crop
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------ the views (one registry entry each)
# A fixed view is a function of the batch; a family (meta `family=True`) takes the parsed name's match and
# returns that function. Adding a view is one entry here (and its name in _EXAMPLES for suggestions).


@TTA_VIEWS.register("identity")
def _identity(x: Tensor) -> Tensor:
    return x


@TTA_VIEWS.register("hflip")
def _hflip(x: Tensor) -> Tensor:
    return x.flip(-1)


@TTA_VIEWS.register("vflip")
def _vflip(x: Tensor) -> Tensor:
    return x.flip(-2)


@TTA_VIEWS.register("rot90")
def _rot90(x: Tensor) -> Tensor:
    _need_square(x, "rot90")
    return torch.rot90(x, 1, dims=(-2, -1))


@TTA_VIEWS.register("rot180")
def _rot180(x: Tensor) -> Tensor:
    return torch.rot90(x, 2, dims=(-2, -1))


@TTA_VIEWS.register("rot270")
def _rot270(x: Tensor) -> Tensor:
    _need_square(x, "rot270")
    return torch.rot90(x, 3, dims=(-2, -1))


@TTA_VIEWS.register("scale<F>", family=True, pattern=_SCALE_RE)
def _scale_view(m: re.Match[str]) -> Callable[[Tensor], Tensor]:
    return lambda x: _scale(x, float(m.group(1)))


@TTA_VIEWS.register("fivecrop<F>_<pos>", family=True, pattern=_FIVECROP_RE)
def _fivecrop_view(m: re.Match[str]) -> Callable[[Tensor], Tensor]:
    if m.group(2) is None:
        raise _bad_view(m.group(0), "not a single view (expand names with parse_views first):")
    frac = float(m.group(1)) if m.group(1) is not None else FIVECROP_DEFAULT
    return lambda x: _crop(x, frac, m.group(2))


def view_fn(view: str) -> Callable[[Tensor], Tensor]:
    """The function of a single view name (after parse_views)."""
    if _fixed(view):
        return TTA_VIEWS.get(view)
    for name in TTA_VIEWS.names():
        meta = TTA_VIEWS.meta(name)
        m = meta["pattern"].fullmatch(view) if meta.get("family") else None
        if m:
            return TTA_VIEWS.get(name)(m)
    raise _bad_view(view, "not a single view (expand names with parse_views first):")


def apply_view(x: Tensor, view: str) -> Tensor:
    """One view of a float batch (B, C, H, W); same shape out."""
    return view_fn(view)(x)


def apply_views(x: Tensor, views: list[str]) -> Tensor:
    """All views of x stacked view-major: (V*B, C, H, W), V = len(parse_views(views))."""
    if x.ndim != 4:
        raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
    return torch.cat([apply_view(x, v) for v in parse_views(views)], dim=0)


def split_views(out: Tensor, n_views: int) -> Tensor:
    """(V*B, ...) model output -> (V, B, ...)."""
    if out.shape[0] % n_views:
        raise ValueError(f"{out.shape[0]} rows do not split into {n_views} views")
    return out.reshape(n_views, out.shape[0] // n_views, *out.shape[1:])


@torch.inference_mode()
def predict_batched(model: nn.Module, x: Tensor, views: list[str], max_batch: int | None = None) -> Tensor:
    """Softmax probabilities (V, B, K) of every view of x, from one forward of V*B rows.

    max_batch: split the V*B rows into forwards of at most this many, when one would not fit in memory.
    The model must be in eval mode: in train mode BatchNorm would mix statistics across views.
    """
    if model.training:
        raise ValueError("predict_batched needs model.eval(): train-mode BatchNorm mixes views")
    names = parse_views(views)
    big = apply_views(x, names)
    if max_batch is None or big.shape[0] <= max_batch:
        logits = model(big)
    else:
        logits = torch.cat([model(chunk) for chunk in big.split(max_batch)], dim=0)
    # Softmax in float32 even under autocast: bf16 probabilities lose the small ones log loss needs.
    return split_views(logits.float().softmax(dim=-1), len(names))


def aggregate(probs: ArrayT, how: str = "mean", weights: ArrayT | None = None, eps: float = 1e-8) -> ArrayT:
    """Combine (V, ..., K) probabilities over the first axis: arithmetic mean, or the geometric mean
    exp(mean log p) renormalised to sum to 1. `weights` (V,) give a weighted mean (they are normalised).
    Tensors in, tensor out; arrays in, array out."""
    if how not in ("mean", "geomean"):
        raise KpipeError(f"infer.agg: unknown aggregation '{how}'; use 'mean' or 'geomean'.")
    is_numpy = isinstance(probs, np.ndarray)
    p = torch.as_tensor(probs, dtype=torch.float64 if is_numpy else None)
    n = p.shape[0]
    w = (
        torch.full((n,), 1.0 / n, dtype=p.dtype, device=p.device)
        if weights is None
        else (torch.as_tensor(weights, dtype=p.dtype, device=p.device))
    )
    if w.shape != (n,) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum")
    w = (w / w.sum()).reshape(n, *([1] * (p.ndim - 1)))
    if how == "mean":
        out = (w * p).sum(0)
    else:
        out = (w * p.clamp_min(eps).log()).sum(0).exp()
        out = out / out.sum(-1, keepdim=True)
    return out.numpy() if is_numpy else out
