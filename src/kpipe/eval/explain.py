"""Pictures of what a trained model does, for `kpipe explain`: filters, feature maps, Grad-CAM, top losses.

Arrays in, uint8 RGB pictures out; the stage writes them. Stages of the backbone are found the way
freezing finds them (kpipe.nn.models.stage_names), so every model kpipe builds is covered; a model
without the part a picture needs (no Conv2d, a stage that gives no 4-D map) gets a KpipeError naming it.
Grad-CAM is hand-written (Selvaraju et al. 2017): hooks keep the last stage's activations and
their gradient; channel weights are the spatial mean of the gradient; the map is ReLU(sum w * A).
Usage: ``cam = grad_cam(model, "layer4", x, class_idx); pic = overlay(rgb, cam)``
"""

from __future__ import annotations

import html

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from kpipe.errors import KpipeError
from kpipe.eval.oof import Oof
from kpipe.nn import models

# ------------------------------------------------------------------ OOF tables


def top_losses(oof: Oof, n: int) -> pd.DataFrame:
    """The n OOF rows with the highest cross-entropy: id, fold, label, predicted, p_label, p_pred, loss."""
    y = oof.y
    p_label = oof.probs[np.arange(len(y)), y]
    pred = oof.probs.argmax(axis=1)
    df = pd.DataFrame(
        {
            "id": oof.ids,
            "fold": oof.folds if oof.folds is not None else -1,
            "label": oof.labels,
            "predicted": [oof.classes[i] for i in pred],
            "p_label": p_label,
            "p_pred": oof.probs[np.arange(len(y)), pred],
            "loss": -np.log(np.clip(p_label, 1e-12, 1)),
        }
    )
    return (
        df.sort_values(["loss", "id"], ascending=[False, True], kind="mergesort")
        .head(n)
        .reset_index(drop=True)
    )


def most_confused(oof: Oof, n: int) -> pd.DataFrame:
    """The n most frequent (label, predicted) pairs with label != predicted, like fastai's most_confused."""
    pred = [oof.classes[i] for i in oof.probs.argmax(axis=1)]
    df = pd.DataFrame({"label": oof.labels, "predicted": pred})
    df = df[df["label"] != df["predicted"]]
    counts = df.value_counts().rename("count").reset_index()
    return (
        counts.sort_values(["count", "label", "predicted"], ascending=[False, True, True])
        .head(n)
        .reset_index(drop=True)
    )


# ------------------------------------------------------------------ pictures


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Min-max scaled to 0..255 (a constant array gives mid-grey, not a division by zero)."""
    lo, hi = float(a.min()), float(a.max())
    return (
        np.full(a.shape, 128, np.uint8) if hi - lo < 1e-12 else ((a - lo) / (hi - lo) * 255).astype(np.uint8)
    )


def tile(pics: list[np.ndarray], cols: int, cell: int, pad: int = 2) -> np.ndarray:
    """Equal-size RGB tiles in a grid on white, each resized (nearest) to cell x cell."""
    if not pics:
        raise ValueError("nothing to tile")
    rows = -(-len(pics) // cols)
    out = np.full((rows * (cell + pad) + pad, cols * (cell + pad) + pad, 3), 255, np.uint8)
    for i, p in enumerate(pics):
        p = np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p
        r, c = divmod(i, cols)
        y, x = pad + r * (cell + pad), pad + c * (cell + pad)
        out[y : y + cell, x : x + cell] = cv2.resize(p, (cell, cell), interpolation=cv2.INTER_NEAREST)
    return out


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, m in models.unwrap(model).named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise KpipeError(
        f"{type(model).__name__} has no Conv2d layer: the first-layer filters picture is unsupported "
        "for it (the other pictures still work)."
    )


def filter_grid(weight: np.ndarray, cell: int = 24, max_filters: int = 64) -> np.ndarray:
    """Conv filters (out, in, kh, kw) as a grid: RGB when the layer reads 3 channels, else their mean in grey.

    All filters share one scale, so a faint filter looks faint.
    """
    w = weight[:max_filters]
    w = w.transpose(0, 2, 3, 1) if w.shape[1] == 3 else w.mean(axis=1)
    scaled = to_uint8(w)
    return tile(list(scaled), cols=min(8, len(scaled)), cell=cell)


def stage_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of each backbone stage (stage_names order) for input x, caught with forward hooks."""
    found: dict[str, torch.Tensor] = {}
    hooks = []
    for stage, last in models.stage_modules(model).items():
        hooks.append(last.register_forward_hook(lambda _m, _i, out, s=stage: found.__setitem__(s, out)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {s: t for s, t in found.items() if isinstance(t, torch.Tensor) and t.ndim == 4}


def strongest_maps(fmap: torch.Tensor, n: int = 8) -> list[np.ndarray]:
    """The n channels of one image's (C, H, W) map with the largest mean activation, each scaled on its own."""
    a = fmap.detach().float().cpu().numpy()
    order = np.argsort(-a.mean(axis=(1, 2)), kind="stable")[:n]
    return [to_uint8(a[c]) for c in order]


def cam_stage(model: nn.Module, outs: dict[str, torch.Tensor], min_side: int = 4) -> str:
    """Grad-CAM's layer: the deepest stage whose map is at least min_side wide (else the deepest 4-D one).

    At small inputs (32-128 px) the last stage is 1x1 to 4x4 and its map says nothing about where;
    the head (fc, classifier) gives 2-D outputs and is never a candidate.
    """
    if not outs:
        raise KpipeError(
            f"{type(model).__name__}: no stage gives a (N, C, H, W) feature map "
            f"(stages: {', '.join(models.stage_names(model))}); Grad-CAM and feature maps are "
            "unsupported for it."
        )
    wide = [s for s, t in outs.items() if min(t.shape[-2:]) >= min_side]
    return wide[-1] if wide else list(outs)[-1]


def grad_cam(model: nn.Module, stage: str, x: torch.Tensor, class_idx: list[int]) -> np.ndarray:
    """(N, H, W) maps in [0, 1] at x's size: where stage's activations raise the score of class_idx[i]."""
    layer = models.stage_modules(model)[stage]
    kept: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        kept["a"] = out

    hook = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # so frozen stages still pass a gradient back to the layer
            logits = model(x)
            logits[torch.arange(len(x)), torch.as_tensor(class_idx)].sum().backward()
    finally:
        hook.remove()
    a, g = kept["a"], kept["a"].grad
    cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
    return (cam / peak).detach().cpu().numpy()


def overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The Grad-CAM map as a jet heat map over the image (both at the image's size)."""
    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(cv2.resize(heat, (rgb.shape[1], rgb.shape[0])), cv2.COLOR_BGR2RGB)
    return (rgb * (1 - alpha) + heat * alpha).astype(np.uint8)


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode a PNG")
    return buf.tobytes()


# ------------------------------------------------------------------ the page


def table_html(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(f'{v:.3f}' if isinstance(v, float) else str(v))}</td>" for v in r)
        + "</tr>"
        for r in df.itertuples(index=False)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_index(title: str, sections: list[tuple[str, str]]) -> str:
    """One page from (heading, inner HTML) sections; pictures are relative links to PNGs beside it."""
    css = (
        "body{font-family:sans-serif;margin:1.5em}img{image-rendering:pixelated;max-width:100%}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}"
        "figure{display:inline-block;margin:4px;text-align:center}figcaption{font-size:80%;max-width:260px}"
    )
    body = "".join(f"<h2>{html.escape(h)}</h2>{inner}" for h, inner in sections)
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
