"""Augmentation presets as data: what each `data.aug` name does, one registry entry each.

`data.aug` is a preset name (none, light, medium, heavy) or a list of single ops (AUG_OPS: crop,
hflip, vflip, rotate, shear, color_jitter, grayscale, cutout), so "add one augmentation at a time"
is a sweep over lists: ``'data.aug=none|hflip|hflip,rotate|hflip,rotate,color_jitter'``. A list
starts from no augmentation (resize only) and each op switches on its part of a Preset.
transforms.build_train turns a preset into an albumentations pipeline and transforms.BatchAugment
into whole-batch ops; this module stays light (no albumentations, no torch) so the config schema can
check names without loading them (config.py validates data.aug). Adding a preset or an op is one `register` line.
Usage: ``AUG_PRESETS.get("medium").min_scale``; ``resolve(["hflip", "rotate"]).rotate``
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from kpipe.registry import AUG_OPS, AUG_PRESETS


@dataclass(frozen=True)
class Preset:
    crop: bool = True  # RandomResizedCrop; False: resize only, as evaluation does
    min_scale: float = 1.0  # smallest crop share of the image area
    flip: bool = True  # HorizontalFlip (p=0.5), unless data.hflip=false
    vflip: bool = False  # VerticalFlip (p=0.5): for images with no "up" (microscopy, satellite)
    rotate: float = 0.0  # degrees, +-; with `shear` an Affine applied with probability affine_p
    shear: float = 0.0
    affine_p: float = 0.0
    jitter: float = 0.0  # ColorJitter brightness, contrast and saturation
    hue: float = 0.0
    jitter_p: float = 0.0
    gray_p: float = 0.0
    dropout_p: float = 0.0  # CoarseDropout, 1-4 holes of 5-20 % of each side

    @property
    def is_identity(self) -> bool:
        """Nothing random: training sees the evaluation pipeline."""
        return self == NOTHING


NOTHING = Preset(crop=False, flip=False)

AUG_PRESETS.register("none")(NOTHING)
AUG_PRESETS.register("light")(Preset(min_scale=0.7))
AUG_PRESETS.register("medium")(
    Preset(min_scale=0.5, rotate=15, affine_p=0.5, jitter=0.2, hue=0.02, jitter_p=0.5, gray_p=0.05)
)
AUG_PRESETS.register("heavy")(
    Preset(
        min_scale=0.3,
        rotate=30,
        shear=10,
        affine_p=0.7,
        jitter=0.4,
        hue=0.05,
        jitter_p=0.8,
        gray_p=0.1,
        dropout_p=0.5,
    )
)

# Single ops: the Preset fields each one sets, at the "medium" strength.
AUG_OPS.register("crop")({"crop": True, "min_scale": 0.5})
AUG_OPS.register("hflip")({"flip": True})
AUG_OPS.register("vflip")({"vflip": True})
AUG_OPS.register("rotate")({"rotate": 15.0, "affine_p": 0.5})
AUG_OPS.register("shear")({"shear": 10.0, "affine_p": 0.5})
AUG_OPS.register("color_jitter")({"jitter": 0.2, "hue": 0.02, "jitter_p": 0.5})
AUG_OPS.register("grayscale")({"gray_p": 0.1})
AUG_OPS.register("cutout")({"dropout_p": 0.5})


def compose(ops: Sequence[str]) -> Preset:
    """The Preset of a list of ops: nothing, plus each op's fields (a field two ops set takes the larger value)."""
    merged: dict[str, float | bool] = {}
    for name in ops:
        for key, value in AUG_OPS.get(name).items():
            merged[key] = max(merged.get(key, value), value)
    return replace(NOTHING, **merged)


def resolve(aug: str | Sequence[str]) -> Preset:
    """data.aug (a preset name or a list of op names) as a Preset."""
    if isinstance(aug, str):
        return AUG_PRESETS.get(aug)
    return compose(aug)
