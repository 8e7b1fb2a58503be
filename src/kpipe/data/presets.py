"""Augmentation presets as data: what each `data.aug` name does, one registry entry each.

transforms.build_train turns a preset into an albumentations pipeline and transforms.BatchAugment
into whole-batch ops; this module stays light (no albumentations, no torch) so the config schema can
check a preset's name without loading them. Adding a preset is one `AUG_PRESETS.register` line.
Usage: ``AUG_PRESETS.get("medium").min_scale``
"""

from __future__ import annotations

from dataclasses import dataclass

from kpipe.registry import AUG_PRESETS


@dataclass(frozen=True)
class Preset:
    crop: bool = True  # RandomResizedCrop (and the flip); False: resize only, as evaluation does
    min_scale: float = 1.0  # smallest crop share of the image area
    rotate: float = 0.0  # degrees, +-; with `shear` an Affine applied with probability affine_p
    shear: float = 0.0
    affine_p: float = 0.0
    jitter: float = 0.0  # ColorJitter brightness, contrast and saturation
    hue: float = 0.0
    jitter_p: float = 0.0
    gray_p: float = 0.0
    dropout_p: float = 0.0  # CoarseDropout, 1-4 holes of 5-20 % of each side


AUG_PRESETS.register("none")(Preset(crop=False))
AUG_PRESETS.register("light")(Preset(min_scale=0.7))
AUG_PRESETS.register("medium")(Preset(min_scale=0.5, rotate=15, affine_p=0.5, jitter=0.2, hue=0.02, jitter_p=0.5, gray_p=0.05))
AUG_PRESETS.register("heavy")(Preset(min_scale=0.3, rotate=30, shear=10, affine_p=0.7, jitter=0.4, hue=0.05,
                                     jitter_p=0.8,
                                     gray_p=0.1, dropout_p=0.5))
