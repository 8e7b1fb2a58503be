"""`kpipe explain`: look inside a trained run; writes runs/<exp>/explain/index.html with PNGs beside it.

One fold's best.pt (default: the first fold) is rebuilt from the run's own config. The page shows its
first-layer filters, the strongest channels of each backbone stage for a few of that fold's validation
images, Grad-CAM overlays on the fold's top-loss validation images (given label, prediction,
probabilities), and, from the whole run's OOF (every image judged by a model that did not train
on it), the top-losses table and the most-confused class pairs.
Usage: ``kpipe explain -c configs/exp/demo.yaml --comp demo [--fold 0] [--images 8]``
"""

from __future__ import annotations

import html

import numpy as np
import torch

from kpipe import paths
from kpipe.config import Config, load_run_config
from kpipe.console import console, safe
from kpipe.data import transforms
from kpipe.data.ingest import load_train
from kpipe.errors import KpipeError
from kpipe.eval import explain as ex
from kpipe.eval.oof import Oof, read_oof
from kpipe.io import write_bytes, write_text
from kpipe.nn import models
from kpipe.nn.engine import load_checkpoint
from kpipe.nn.predict import data_config, fold_of, make_eval_loader
from kpipe.paths import RunDir

N_PAIRS = 10


def _model(run: RunDir, fold: int | None, classes: list[str]) -> tuple[torch.nn.Module, int, dict]:
    done = sorted((f for f in run.fold_dirs() if f.best.is_file()), key=lambda f: fold_of(f.best))
    if not done:
        raise KpipeError(f"{run.root}: no fold<k>/best.pt. Train the run first (kpipe train).")
    pick = done[0] if fold is None else next((f for f in done if fold_of(f.best) == fold), None)
    if pick is None:
        raise KpipeError(
            f"{run.root}: fold {fold} has no best.pt; trained folds: "
            f"{', '.join(str(fold_of(f.best)) for f in done)}."
        )
    rcfg = load_run_config(run.root)
    ck = load_checkpoint(pick.best)
    model = models.create_from_config(
        rcfg.model.model_copy(update={"pretrained": False, "weights": None}), len(classes)
    )
    model.load_state_dict(ck["model"])
    return model.eval(), fold_of(pick.best), data_config(ck, model, rcfg)


def _batch(files: list[str], dc: dict) -> tuple[torch.Tensor, np.ndarray]:
    """(normalised input, the uint8 RGB images as the model sees them) for a few files."""
    loader = make_eval_loader(files, dc, len(files), 0, torch.device("cpu"), tolerant=False)
    x, *_ = next(iter(loader))
    rgb = transforms.to_nchw(x).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return transforms.Normalize(dc["mean"], dc["std"])(x), rgb


def _figure(name: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}'
        "</figcaption></figure>"
    )


def run(cfg: Config, fold: int | None = None, images: int = 8) -> RunDir:
    """Write the report for one fold's model; returns the run folder."""
    if images < 1:
        raise KpipeError(f"--images {images}: show at least one image.")
    run_dir = paths.run_dir(cfg)
    oof: Oof = read_oof(run_dir.oof)
    model, k, dc = _model(run_dir, fold, oof.classes)
    out = run_dir.explain_dir
    for old in [*out.glob("maps_*.png"), *out.glob("gradcam_*.png")]:  # a smaller --images leaves none behind
        old.unlink()
    files = dict(zip(*(load_train(cfg).df[c] for c in ("id", "path")), strict=True))
    losses = ex.top_losses(oof, len(oof.ids))
    mine = (
        losses[(losses["fold"] == k) & losses["id"].isin(files)] if oof.folds is not None else losses.iloc[:0]
    )
    if mine.empty:
        raise KpipeError(
            f"{run_dir.oof}: no OOF rows of fold {k} with an image file; the fold's validation "
            "images are needed to look inside its model."
        )
    sections = []

    name, conv = ex.first_conv(model)
    write_bytes(out / "filters.png", ex.png(ex.filter_grid(conv.weight.detach().cpu().numpy())))
    sections.append(("First-layer filters", _figure("filters.png", f"{name}: {tuple(conv.weight.shape)}")))

    sample = mine.sort_values("id").head(images)  # a fixed sample of the fold's validation images
    x, rgb = _batch([files[i] for i in sample["id"]], dc)
    outs = ex.stage_outputs(model, x)
    layer = ex.cam_stage(model, outs)
    figs = []
    for stage, fmap in outs.items():
        for j, image_id in enumerate(sample["id"][:4]):
            fname = f"maps_{stage}_{j}.png"
            write_bytes(out / fname, ex.png(ex.tile([rgb[j], *ex.strongest_maps(fmap[j])], cols=9, cell=64)))
            figs.append(_figure(fname, f"{stage} {tuple(fmap.shape[1:])}: {image_id}"))
    sections.append(("Feature maps of each stage (image, then its 8 strongest channels)", "".join(figs)))

    top = mine.head(images)
    x, rgb = _batch([files[i] for i in top["id"]], dc)
    index = {c: i for i, c in enumerate(oof.classes)}
    figs = []
    for what, col in (("given", "label"), ("predicted", "predicted")):
        cams = ex.grad_cam(model, layer, x, [index[c] for c in top[col]])
        pics = [ex.overlay(rgb[j], cams[j]) for j in range(len(top))]
        fname = f"gradcam_{what}.png"
        write_bytes(out / fname, ex.png(ex.tile(pics, cols=min(8, len(pics)), cell=128)))
        figs.append(_figure(fname, f"Grad-CAM ({layer}) toward the {what} class, in table order"))
    sections.append(
        (
            f"Grad-CAM on fold {k}'s top-loss validation images",
            "".join(figs) + ex.table_html(top[["id", "label", "predicted", "p_label", "p_pred", "loss"]]),
        )
    )
    sections.append(("Top losses over the whole OOF", ex.table_html(losses.head(max(images, 16)))))
    pairs = ex.most_confused(oof, N_PAIRS)
    sections.append(("Most confused pairs (OOF)", ex.table_html(pairs) if len(pairs) else "<p>none</p>"))
    write_text(run_dir.explain_html, ex.render_index(f"kpipe explain: {run_dir.name}, fold {k}", sections))
    console.print(f"wrote {safe(run_dir.explain_html)} ({len(list(out.glob('*.png')))} pictures)")
    return run_dir
