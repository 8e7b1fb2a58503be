"""`kpipe cache`: build the decode-once image cache of the training images ahead of `kpipe train`.

The same cache `kpipe train` builds itself when data.cache=true (train images of the folds file,
at data.img_size or the model's own input size), built alone: to pay the decode once before a sweep,
to see its size, and for `kpipe bench --scale`, which times it as a stage of its own.
Usage: ``kpipe cache -c configs/exp/r18.yaml --comp demo``
"""

from __future__ import annotations

from pathlib import Path

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console, safe
from kpipe.data import cache
from kpipe.data.folds import load_fold_table
from kpipe.io import human_bytes
from kpipe.nn import models


def run(cfg: Config) -> Path:
    """Build (or reuse) data.cache_dir/<comp>/<size>/train.npy for every image of the folds file; return its path."""
    df, _ = load_fold_table(cfg)
    size = cfg.data.img_size or models.default_input_size(
        cfg.model
    )  # as train sizes it, without building a model
    path = paths.cache_file(cfg, size, "train")
    arr = cache.build_cache(df["path"].tolist(), size, path)
    console.print(f"cache: {safe(path)} holds {len(arr)} images at {size} px ({human_bytes(arr.nbytes)})")
    return path
