"""Decode-once image cache: every image decoded and resized once, then memory-mapped every epoch.

Images are decoded with `image.read_rgb`, resized to img_size x img_size with cv2.INTER_AREA
(`image.resize_square`, the same resize as the eval transform) and stored in one uint8 .npy
file of shape (N, S, S, 3), row i = paths[i]. Beside it, `<name>.index.json` records the
paths, the size and each source file's mtime and byte size: when any of them changes, the
cache is stale and is rebuilt.

Building is resumable and atomic: rows are filled in chunks into `<name>.npy.partial` and
`<name>.progress.json` records how many are done after each chunk is flushed, so a killed
build carries on where it stopped; the finished file is renamed into place and only then is
the index written. Before a new file is made, `io.check_free_space` refuses when the disk holds
less than the cache's size (N x S x S x 3 bytes). A lock file (`io.exclusive`) makes a second process (another DDP rank) wait
for the first, on every OS.

Unreadable images never become silent zeros: their rows are zero-filled but listed in the
index under "failed", and `build_cache` raises (on_error="raise", for training) or logs a
warning and returns (on_error="skip", for test sets, where every id still needs a row;
`failed_rows` says which).
Usage: ``arr = build_cache(df.path.tolist(), 224, paths.cache_file(cfg, 224, "train"))``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kpipe.data.image import ImageReadError, read_rgb, resize_square
from kpipe.errors import KpipeError, preview
from kpipe.io import check_free_space, exclusive, write_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the decode or resize changes, so old caches are rebuilt


def _aux(cache_file: Path, suffix: str) -> Path:
    return cache_file.with_name(cache_file.stem + suffix)


def _source_stats(paths: Sequence[str]) -> list[list[int] | None]:
    out: list[list[int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append(None)  # missing: recorded, so the cache goes stale when the file appears
            continue
        out.append([st.st_mtime_ns, st.st_size])
    return out


def _signature(paths: Sequence[str], img_size: int, stats: list[list[int] | None]) -> str:
    blob = json.dumps([CACHE_VERSION, img_size, list(paths), stats], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # torn by something other than kpipe: treat as absent and rebuild
    return data if isinstance(data, dict) else None


def _load_one(path: str, img_size: int) -> np.ndarray | str:
    """The resized image, or the reason it cannot be read."""
    try:
        return resize_square(read_rgb(path), img_size)
    except ImageReadError as e:
        return e.reason


def build_cache(
    paths: Sequence[str | os.PathLike[str]],
    img_size: int,
    cache_file: str | os.PathLike[str],
    *,
    on_error: Literal["raise", "skip"] = "raise",
    workers: int | None = None,
    chunk_rows: int = 512,
) -> np.memmap:
    """Build (or reuse, or resume) the cache of `paths` at `img_size`; return it memory-mapped, read-only.

    workers: decoding threads (OpenCV releases the GIL); default: the CPUs this process may use.
    """
    cache_file = Path(cache_file)
    paths = [str(p) for p in paths]
    if not paths:
        raise KpipeError(f"{cache_file}: no images to cache.")
    stats = _source_stats(paths)
    sig = _signature(paths, img_size, stats)
    index_file = _aux(cache_file, ".index.json")
    with exclusive(_aux(cache_file, ".lock")):
        index = _read_json(index_file)
        if not (index and index.get("signature") == sig and cache_file.is_file()):
            index_file.unlink(missing_ok=True)  # a stale index must never vouch for a new file
            failed = _fill(paths, img_size, cache_file, sig, workers or _cpus(), chunk_rows)
            index = {
                "version": CACHE_VERSION,
                "img_size": img_size,
                "n": len(paths),
                "signature": sig,
                "failed": {str(i): r for i, r in sorted(failed.items())},
                "paths": paths,
                "sources": stats,
            }
            write_json(index_file, index)
            _aux(cache_file, ".progress.json").unlink(missing_ok=True)
    _report_failures(cache_file, index, on_error)
    return np.load(cache_file, mmap_mode="r")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fill(
    paths: list[str], img_size: int, cache_file: Path, sig: str, workers: int, chunk_rows: int
) -> dict[int, str]:
    """Fill rows into the partial file, resuming a matching earlier attempt; rename it into place."""
    partial = cache_file.with_name(cache_file.name + ".partial")
    progress_file = _aux(cache_file, ".progress.json")
    shape = (len(paths), img_size, img_size, 3)
    progress = _read_json(progress_file)
    if progress and progress.get("signature") == sig and partial.is_file():
        arr = np.lib.format.open_memmap(partial, mode="r+")
        filled, failed = int(progress["filled"]), {int(k): v for k, v in progress["failed"].items()}
        log.info("cache %s: resuming at %d/%d", cache_file, filled, len(paths))
    else:
        partial.unlink(missing_ok=True)  # a stale attempt's space is free again before it is counted
        # The .npy is sparse until filled: without this check a full disk shows up mid-build as a failed write.
        check_free_space(
            cache_file.parent,
            int(np.prod(shape)),
            f"the {img_size} px image cache of {len(paths)} images",
            "data.cache_dir (or data.cache=false, or a smaller data.img_size)",
        )
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        filled, failed = 0, {}
    t0, last_log = time.monotonic(), 0.0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(filled, len(paths), chunk_rows):
            rows = range(start, min(start + chunk_rows, len(paths)))
            for i, result in zip(
                rows, pool.map(_load_one, [paths[i] for i in rows], [img_size] * len(rows)), strict=True
            ):
                if isinstance(result, str):
                    failed[i] = result
                    arr[i] = 0
                else:
                    arr[i] = result
            arr.flush()  # rows on disk before the progress file says they are
            write_json(progress_file, {"signature": sig, "filled": rows.stop, "failed": failed})
            if time.monotonic() - last_log > 10 or rows.stop == len(paths):
                last_log = time.monotonic()
                rate = (rows.stop - filled) / max(last_log - t0, 1e-9)
                log.info("cache %s: %d/%d images (%.0f/s)", cache_file.name, rows.stop, len(paths), rate)
    del arr  # close the memmap before the rename
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, cache_file)
    return failed


def _report_failures(cache_file: Path, index: dict[str, Any], on_error: str) -> None:
    failed = index.get("failed") or {}
    if not failed:
        return
    paths = index["paths"]
    lines = [f"{paths[int(i)]}: {reason}" for i, reason in failed.items()]
    msg = f"{len(failed)} of {index['n']} images could not be read; their rows in {cache_file} are zeros: {preview(lines, 3)}"
    if on_error == "raise":
        raise KpipeError(f"{msg}. Leave them out of the image list (see `kpipe audit`) or fix the files.")
    log.warning("%s", msg)


def open_cache(
    cache_file: str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]] | None = None,
    img_size: int | None = None,
) -> np.memmap:
    """Open a finished cache read-only. With paths and img_size, also check it is not stale.

    A `loader.ImageDataset` over the returned memmap pickles it as a reference, so a DataLoader
    worker started with `spawn` maps the file again rather than receiving a copy of it.
    """
    cache_file = Path(cache_file)
    index = _read_json(_aux(cache_file, ".index.json"))
    if index is None or not cache_file.is_file():
        raise KpipeError(f"{cache_file}: no finished cache here; build it first (data.cache=true builds it).")
    if paths is not None:
        if img_size is None:
            raise ValueError("open_cache: pass img_size together with paths")
        paths = [str(p) for p in paths]
        if index.get("signature") != _signature(paths, img_size, _source_stats(paths)):
            raise KpipeError(
                f"{cache_file}: stale (images, their files or the size changed); rebuild it with build_cache."
            )
    return np.load(cache_file, mmap_mode="r")


def failed_rows(cache_file: str | os.PathLike[str]) -> dict[int, str]:
    """Row -> reason for the images a finished cache could not read (their rows are zeros)."""
    index = _read_json(_aux(Path(cache_file), ".index.json"))
    if index is None:
        raise KpipeError(f"{cache_file}: no finished cache here.")
    return {int(k): v for k, v in (index.get("failed") or {}).items()}
