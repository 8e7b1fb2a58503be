"""`kpipe bench`: how fast kpipe loads, predicts and trains on this machine, against plain baselines.

A tool of the interface layer, split by concern: `images` writes the synthetic photo-like JPEG set,
`harness` holds a run's sizes and times cases in interleaved rounds, `cases` builds each measurement
(loaders, inference with and without TTA, training steps), `suite` runs the sections in order, and
`report` checks the targets and writes results.md and results.json; `timm_ref` trains end to end from
the JPEGs through timm's own pipeline and through kpipe's, for the GPU section; `scale` (`--scale N`) times
audit, folds, cache and infer as subprocesses at N and 4N images. What each row measures and why
each target is set where it is: docs/bench.md. May import any library layer; nothing imports it.
Usage: ``from kpipe.tools import bench; bench.run(Path("bench"), n_images=1000, repeats=3, quick=False)``
"""

from kpipe.tools.bench.cases import consumer_batch_aug, tutorial_transform
from kpipe.tools.bench.harness import Plan, make_plan
from kpipe.tools.bench.images import N_CLASSES, image_set, photo
from kpipe.tools.bench.report import GPU_TARGETS, TARGETS, check_targets
from kpipe.tools.bench.scale import SCALE_TARGETS, check_scale, growth, run_scale
from kpipe.tools.bench.suite import gpu_section, run
from kpipe.tools.bench.timm_ref import kpipe_train_cases, timm_train_case

__all__ = [
    "GPU_TARGETS",
    "N_CLASSES",
    "SCALE_TARGETS",
    "TARGETS",
    "Plan",
    "check_scale",
    "check_targets",
    "consumer_batch_aug",
    "gpu_section",
    "growth",
    "image_set",
    "kpipe_train_cases",
    "make_plan",
    "photo",
    "run",
    "run_scale",
    "timm_train_case",
    "tutorial_transform",
]
