"""Audit a competition's images before anything trains on them.

One pass reads and decodes every train and test file once and, from that one decode, finds
unreadable files (missing, zero-byte, not an image, truncated), odd modes (16-bit, RGBA, CMYK,
palette, gray), tiny and extreme-aspect images, exact duplicates (sha256 of the bytes) and near
duplicates (64-bit DCT perceptual hash within a Hamming threshold, confirmed by the correlation
of 32x32 thumbnails) within train, within test and across train<->test (leakage), and duplicates
that carry different labels. Train duplicates form groups (connected components) that
`kpipe folds` keeps inside one fold; train rows found unreadable are left out by `kpipe folds`.
Writes <work_dir>/audit/: images.csv, unreadable.csv, modes.csv, odd_sizes.csv,
exact_duplicates.csv, near_duplicates.csv, leakage.csv, identical_classes.csv (each class of
identical thumbnails once, with its size), label_conflicts.csv, groups.csv, summary.json.
Memory stays linear in the number of images: a class of thousands of identical (e.g. blank) images
is listed once with its size and as a star of pairs, never as all its n^2 / 2 pairs (dedup.BIG_CLASS),
and no image over the decode pixel limit (image.max_pixels) is decoded.

Usage: ``kpipe audit --comp demo`` or ``summary = audit.run(cfg, threshold=6)``.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.progress import track
from rich.table import Table

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console
from kpipe.data.dedup import MAX_PAIRS, DupGraph, connected_groups, dup_graph, expand_pairs, train_group_edges
from kpipe.data.image import max_pixels
from kpipe.data.ingest import fingerprint
from kpipe.io import write_csv, write_json

NEAR_THRESHOLD = 6  # max pHash Hamming distance (of 64 bits): a resized, re-encoded copy mostly scores 0-4
MIN_SIMILARITY = 0.97  # ...and a match counts only if the thumbnails correlate this well (see dup_graph)
THUMB = 32  # side of the gray thumbnail both checks look at
TINY_SIDE = 32  # an image with a side below this many pixels is "tiny"
MAX_ASPECT = 4.0  # long side / short side above this is "extreme aspect"
SPLIT_ORDER = {"train": 0, "test": 1}
INFO_COLS = [
    "bytes",
    "sha256",
    "format",
    "mode",
    "bit_depth",
    "width",
    "height",
    "phash",
    "thumb",
    "reason",
    "detail",
]


# ------------------------------------------------------------------ one file, one decode


class _Unreadable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def inspect_file(path: str) -> dict[str, Any]:
    """Read one file once and decode it once; return everything the audit needs about it.

    Keys: bytes, sha256, format, mode, bit_depth, width, height (after EXIF rotation), phash
    (int, 64 bits), thumb (32x32 uint8 gray, as bytes), reason ("" when readable, else
    missing / io_error / zero_byte / not_image / truncated / decode_error / too_large) and
    detail (a human-readable why).
    """
    rec: dict[str, Any] = dict.fromkeys(INFO_COLS, None) | {"reason": "", "detail": ""}
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return rec | {"reason": "missing", "detail": "no such file"}
    except OSError as e:  # a directory, no permission, an I/O error: all say "cannot read"
        return rec | {"reason": "io_error", "detail": f"{type(e).__name__}: {e.strerror or e}"}
    rec["bytes"] = len(data)
    if not data:
        return rec | {"reason": "zero_byte", "detail": "file is empty"}
    rec["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        info, gray = _decode(data)
    except _Unreadable as e:
        return rec | {"reason": e.reason, "detail": e.detail}
    thumb = thumbnail(gray)
    return rec | info | {"phash": phash(thumb), "thumb": thumb.tobytes()}


def _decode(data: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """Header facts, structural completeness and a full decode to gray, or _Unreadable."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _Unreadable("too_large", str(e)) from None
    except UnidentifiedImageError:
        raise _Unreadable("not_image", f"not an image file (starts with {data[:16]!r})") from None
    except Exception as e:  # any decoder failure is a finding about this file, not a bug here
        raise _Unreadable("decode_error", f"{type(e).__name__}: {e}") from None
    fmt, mode = img.format or "unknown", img.mode
    width, height = img.size
    if width * height > max_pixels():  # from the header, before any pixel is decoded (read_rgb's limit)
        raise _Unreadable(
            "too_large",
            f"{width} x {height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels():,} (KPIPE_MAX_PIXELS)",
        )
    if not is_complete(data, fmt):
        raise _Unreadable("truncated", f"{fmt} data ends before its end marker ({len(data)} bytes)")
    try:
        if fmt == "JPEG":  # DCT-domain downscale: still decodes every byte, at a fraction of the cost
            img.draft("L", (64, 64))
        img.load()  # full decode; Pillow raises on short data unless LOAD_TRUNCATED_IMAGES was set
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap the sides
            width, height = height, width
        img = ImageOps.exif_transpose(img)
        gray = _to_gray(img)
    except Exception as e:  # as above: recorded per file, with the decoder's message
        reason = "truncated" if "truncated" in str(e).lower() else "decode_error"
        raise _Unreadable(reason, f"{type(e).__name__}: {e}") from None
    info = {
        "format": fmt,
        "mode": mode,
        "bit_depth": bit_depth(data, fmt, mode),
        "width": width,
        "height": height,
    }
    return info, gray


def _to_gray(img: Image.Image) -> np.ndarray:
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):  # convert("L") would clip >255, not rescale
        return np.asarray(img, dtype=np.float32)
    return np.asarray(img.convert("L"), dtype=np.float32)


_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")  # skips stuffed FF00, fill bytes and RSTn in scans
_STANDALONE = {0x01, 0xD8}  # markers without a length field


def is_complete(data: bytes, fmt: str) -> bool:
    """Whether a JPEG reaches its EOI marker, a PNG its IEND chunk, a WebP its RIFF size.

    Libraries decode a cut-off JPEG without complaint (grey bottom rows), so the markers are
    walked: segments by their lengths, scan data up to the next marker. Data after the end
    marker (camera trailers, motion-photo video) is allowed. Other formats rely on the decoder.
    """
    if fmt == "JPEG":
        pos = 2
        while (m := _JPEG_MARKER.search(data, pos)) is not None:
            marker = data[m.start() + 1]
            if marker == 0xD9:
                return True
            if marker in _STANDALONE:
                pos = m.start() + 2
                continue
            if m.start() + 4 > len(data):
                return False
            pos = m.start() + 2 + int.from_bytes(data[m.start() + 2 : m.start() + 4], "big")
        return False
    if fmt == "PNG":
        pos = 8
        while pos + 12 <= len(data):
            end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
            if end > len(data):
                return False
            if data[pos + 4 : pos + 8] == b"IEND":
                return True
            pos = end
        return False
    if fmt == "WEBP":
        return len(data) >= 8 + int.from_bytes(data[4:8], "little")
    return True


def bit_depth(data: bytes, fmt: str, mode: str) -> int:
    """Bits per channel; from the PNG header, since Pillow reads 16-bit RGB PNGs as 8-bit RGB."""
    if fmt == "PNG" and len(data) >= 25:
        return data[24]
    if mode.startswith("I;16"):
        return 16
    return {"I": 32, "F": 32, "1": 1}.get(mode, 8)


def thumbnail(gray: np.ndarray) -> np.ndarray:
    """The 32x32 uint8 area-averaged gray picture that both duplicate checks look at."""
    g = np.clip(np.asarray(gray, dtype=np.float32), 0, None)
    top = float(g.max())
    if top > 255:  # 16/32-bit: rescale, the picture not its bit depth is what matters here
        g *= 255.0 / top
    return np.rint(cv2.resize(g, (THUMB, THUMB), interpolation=cv2.INTER_AREA)).astype(np.uint8)


def phash(thumb: np.ndarray) -> int:
    """64-bit perceptual hash: 2-D DCT of the 32x32 thumbnail, low 8x8 coefficients above their median."""
    low = cv2.dct(np.asarray(thumb, dtype=np.float32))[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def inspect_files(paths: Sequence[str], workers: int = 2) -> list[dict[str, Any]]:
    """inspect_file over many files, on `workers` processes in chunks (serial for small jobs)."""
    label = f"auditing {len(paths)} images"
    if workers <= 1 or len(paths) < 64:
        return [inspect_file(p) for p in track(paths, description=label, transient=True, console=console)]
    chunksize = max(1, min(256, len(paths) // (workers * 16)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(inspect_file, paths, chunksize=chunksize)
        return list(track(results, total=len(paths), description=label, transient=True, console=console))


# ------------------------------------------------------------------ pairs and groups


def _sort_items(items: pd.DataFrame) -> pd.DataFrame:
    # Train before test, then by id: a pair (a < b) then reads train->test, and outputs are stable.
    rank = items["split"].map(SPLIT_ORDER).fillna(len(SPLIT_ORDER))
    out = items.assign(_rank=rank).sort_values(["_rank", "id"], kind="stable").drop(columns="_rank")
    out["phash"] = [
        int(h) if pd.notna(h) else None for h in out["phash"]
    ]  # exact 64-bit ints, whatever the dtype
    return out.reset_index(drop=True).astype({c: "Int64" for c in ("bytes", "bit_depth", "width", "height")})


def audit_tables(
    items: pd.DataFrame,
    threshold: int = NEAR_THRESHOLD,
    min_similarity: float = MIN_SIMILARITY,
    max_pairs: int = MAX_PAIRS,
    tiny_side: int = TINY_SIDE,
    max_aspect: float = MAX_ASPECT,
) -> tuple[dict[str, pd.DataFrame], bool]:
    """Every audit table from inspected items: columns id, split, label, path and inspect_file's keys.

    Returns ({file stem: table}, whether the pair listings were cut at max_pairs).
    """
    items = _sort_items(items)
    good = items[items["reason"] == ""].reset_index(drop=True)
    thumbs = np.frombuffer(b"".join(good["thumb"]), dtype=np.uint8).reshape(len(good), THUMB * THUMB)
    g = dup_graph(good["phash"].to_numpy(np.uint64), thumbs, threshold, min_similarity)
    a, b, d, s, truncated = expand_pairs(g, max_pairs)
    col = {c: good[c].to_numpy() for c in ("id", "split", "label", "sha256")}
    pairs = pd.DataFrame(
        {
            "id_a": col["id"][a],
            "split_a": col["split"][a],
            "id_b": col["id"][b],
            "split_b": col["split"][b],
            "distance": d,
            "similarity": s.round(4),
            "label_a": col["label"][a],
            "label_b": col["label"][b],
            "exact": col["sha256"][a] == col["sha256"][b],
        }
    ).iloc[np.lexsort((b, a))]
    leakage = pairs[(pairs["split_a"] == "train") & (pairs["split_b"] == "test")].rename(
        columns={"id_a": "train_id", "id_b": "test_id", "label_a": "train_label"}
    )
    groups = _train_groups(items, good, g)
    tables = {
        "images": items.drop(columns="thumb").assign(
            phash=[f"{int(h):016x}" if isinstance(h, int) else "" for h in items["phash"]]
        ),
        "unreadable": items.loc[items["reason"] != "", ["id", "split", "path", "reason", "detail"]],
        "modes": _modes(good),
        "odd_sizes": _odd_sizes(good, tiny_side, max_aspect),
        "exact_duplicates": good.loc[
            good["sha256"].duplicated(keep=False), ["sha256", "id", "split", "label", "path"]
        ].sort_values("sha256", kind="stable"),
        "near_duplicates": pairs.loc[
            ~pairs["exact"],
            ["id_a", "split_a", "id_b", "split_b", "distance", "similarity", "label_a", "label_b"],
        ],
        "leakage": leakage[["train_id", "test_id", "train_label", "distance", "similarity", "exact"]],
        "identical_classes": _identical_classes(good, g),
        "label_conflicts": _label_conflicts(groups),
        "groups": groups[["id", "group"]],
    }
    return {k: v.reset_index(drop=True) for k, v in tables.items()}, truncated


def _identical_classes(good: pd.DataFrame, g: DupGraph) -> pd.DataFrame:
    """One row per class of identical thumbnails (2+ images), largest first: its first id, its size, how many
    are train / test and how many labels its train images carry. A class of 20,000 blank images is one row."""
    df = good[["id", "split", "label"]].assign(
        cls=g.inverse, train=good["split"] == "train", test=good["split"] == "test"
    )
    df["train_label"] = df["label"].where(df["train"])
    out = df.groupby("cls", sort=False).agg(
        first_id=("id", "first"),
        size=("id", "size"),
        train=("train", "sum"),
        test=("test", "sum"),
        labels=("train_label", "nunique"),
    )
    out = out[out["size"] > 1].sort_values(["size", "first_id"], ascending=[False, True], kind="stable")
    return out.astype({"size": int, "train": int, "test": int, "labels": int})


def _train_groups(items: pd.DataFrame, good: pd.DataFrame, g: DupGraph) -> pd.DataFrame:
    """id, label, path, group of every train row; unreadable rows are singletons."""
    train_good = (good["split"] == "train").to_numpy()
    names = connected_groups(good["id"].tolist(), *train_group_edges(g, train_good))
    by_id = {i: n for i, n, t in zip(good["id"], names, train_good, strict=True) if t}
    train = items.loc[items["split"] == "train", ["id", "label", "path"]]
    return train.assign(group=[by_id.get(i, i) for i in train["id"]])


def _label_conflicts(groups: pd.DataFrame) -> pd.DataFrame:
    n_labels = groups.groupby("group")["label"].transform("nunique")
    return groups.loc[n_labels > 1, ["group", "id", "label", "path"]].sort_values(
        ["group", "id"], kind="stable"
    )


def _modes(good: pd.DataFrame) -> pd.DataFrame:
    keys = ["split", "format", "mode", "bit_depth"]
    out = good.groupby(keys, sort=False).agg(count=("id", "size"), example_id=("id", "first")).reset_index()
    out["odd"] = (out["mode"] != "RGB") | (out["bit_depth"] != 8)
    return out.sort_values(["split", "count"], ascending=[False, False], kind="stable")


def _odd_sizes(good: pd.DataFrame, tiny_side: int, max_aspect: float) -> pd.DataFrame:
    w, h = good["width"].to_numpy(np.int64), good["height"].to_numpy(np.int64)
    tiny = np.minimum(w, h) < tiny_side
    extreme = np.maximum(w, h) > max_aspect * np.minimum(w, h)
    reason = np.where(tiny & extreme, "tiny;extreme_aspect", np.where(tiny, "tiny", "extreme_aspect"))
    return good.assign(reason=reason).loc[tiny | extreme, ["id", "split", "width", "height", "reason"]]


def summarize(tables: dict[str, pd.DataFrame], truncated: bool, **params: Any) -> dict[str, Any]:
    """Counts for summary.json and the printed table; `params` (threshold, ...) are recorded as given."""
    unreadable, modes, near, sizes = (
        tables["unreadable"],
        tables["modes"],
        tables["near_duplicates"],
        tables["odd_sizes"],
    )
    group_sizes = tables["groups"]["group"].value_counts()
    near_kind = near["split_a"] + "-" + near["split_b"]

    def by_split(df: pd.DataFrame, weight: str | None = None) -> dict[str, int]:
        return {
            s: int(df.loc[df["split"] == s, weight].sum() if weight else (df["split"] == s).sum())
            for s in SPLIT_ORDER
        }

    return {
        **params,
        "images": by_split(tables["images"]),
        "unreadable": by_split(unreadable),
        "unreadable_by_reason": {k: int(v) for k, v in unreadable["reason"].value_counts().items()},
        "odd_mode": by_split(modes[modes["odd"]], weight="count"),
        "modes": {
            f"{f} {m} {b}-bit": int(c)
            for (f, m, b), c in modes.groupby(["format", "mode", "bit_depth"])["count"].sum().items()
        },
        "tiny": by_split(sizes[sizes["reason"].str.contains("tiny")]),
        "extreme_aspect": by_split(sizes[sizes["reason"].str.contains("extreme")]),
        "exact_duplicate_files": by_split(tables["exact_duplicates"]),
        "exact_duplicate_sets": int(tables["exact_duplicates"]["sha256"].nunique()),
        "near_duplicate_pairs": {
            k: int((near_kind == k).sum()) for k in ("train-train", "test-test", "train-test")
        },
        "leakage_pairs": len(tables["leakage"]),
        "leaked_test_ids": int(tables["leakage"]["test_id"].nunique()),
        "largest_identical_class": int(tables["identical_classes"]["size"].max())
        if len(tables["identical_classes"])
        else 0,
        "label_conflict_groups": int(tables["label_conflicts"]["group"].nunique()),
        "label_conflict_ids": len(tables["label_conflicts"]),
        "duplicate_groups": int((group_sizes > 1).sum()),
        "grouped_train_ids": int(group_sizes[group_sizes > 1].sum()),
        "largest_group": int(group_sizes.max()) if len(group_sizes) else 0,
        "pairs_truncated": truncated,
    }


# ------------------------------------------------------------------ stage


def collect_items(cfg: Config) -> pd.DataFrame:
    """Every train and test file of the competition: id, split, label, path, reason (preset when there is no file)."""
    from kpipe.data.ingest import OUTSIDE, load_test, load_train

    ing = load_train(cfg)
    ex = ing.excluded.reindex(columns=["id", "label", "path", "reason"]).fillna("")
    has_file = ex["path"] != ""  # e.g. zero-byte files ingest left out: the audit still lists them
    lost = ~has_file & (ex["reason"].str.contains("not found") | (ex["reason"] == OUTSIDE))
    test = load_test(cfg)
    refused = test["reason"] == OUTSIDE  # never inspected: its id would name a file outside the test folder
    frames = [
        ing.df[["id", "label", "path"]].assign(split="train", reason="", detail=""),
        ex.loc[has_file, ["id", "label", "path"]].assign(split="train", reason="", detail=""),
        ex.loc[lost, ["id", "label", "path"]].assign(
            split="train", reason="missing", detail="ingest: " + ex.loc[lost, "reason"]
        ),
        test.loc[~refused, ["id", "path"]].assign(split="test", label="", reason="", detail=""),
        test.loc[refused, ["id", "path"]].assign(
            split="test", label="", reason="missing", detail="ingest: " + OUTSIDE
        ),
    ]
    return pd.concat(frames, ignore_index=True)[["id", "split", "label", "path", "reason", "detail"]]


def run(
    cfg: Config,
    threshold: int = NEAR_THRESHOLD,
    min_similarity: float = MIN_SIMILARITY,
    workers: int = 2,
    max_pairs: int = MAX_PAIRS,
) -> dict[str, Any]:
    """Inspect every file, write <work_dir>/audit/*.csv and summary.json, print a summary; return it."""
    source = fingerprint(cfg)  # before reading: a change during the audit then shows as a mismatch
    items = collect_items(cfg)
    todo = items["reason"] == ""
    info = pd.DataFrame(
        inspect_files(items.loc[todo, "path"].astype(str).tolist(), workers),
        columns=INFO_COLS,
        index=items.index[todo],
    ).reindex(items.index)
    info.loc[~todo, ["reason", "detail"]] = items.loc[~todo, ["reason", "detail"]]
    items = pd.concat([items.drop(columns=["reason", "detail"]), info], axis=1)
    tables, truncated = audit_tables(items, threshold, min_similarity, max_pairs)
    out = paths.audit_dir(cfg)
    for name, table in tables.items():
        write_csv(paths.audit_table(cfg, name), table)
    params = {
        "threshold": threshold,
        "min_similarity": min_similarity,
        "tiny_side": TINY_SIDE,
        "max_aspect": MAX_ASPECT,
        "max_pairs": max_pairs,
    }
    summary = {
        "competition": cfg.competition.name,
        "train_fingerprint": source,
        **summarize(tables, truncated, **params),
    }
    write_json(paths.audit_summary(cfg), summary)
    print_summary(summary, out)
    return summary


def print_summary(s: dict[str, Any], out: Path) -> None:
    table = Table(title=f"kpipe audit: {s['competition']}")
    for col in ("check", "train", "test", "train↔test"):
        table.add_column(col, justify="left" if col == "check" else "right")
    for name, key in [
        ("images", "images"),
        ("unreadable", "unreadable"),
        ("odd mode (not 8-bit RGB)", "odd_mode"),
        (f"tiny (<{s['tiny_side']} px)", "tiny"),
        (f"aspect > {s['max_aspect']:g}:1", "extreme_aspect"),
        ("exact-duplicate files", "exact_duplicate_files"),
    ]:
        table.add_row(name, str(s[key]["train"]), str(s[key]["test"]), "")
    near = s["near_duplicate_pairs"]
    table.add_row(
        f"near-duplicate pairs (pHash ≤{s['threshold']}, r ≥{s['min_similarity']:g})",
        str(near["train-train"]),
        str(near["test-test"]),
        str(near["train-test"]),
    )
    table.add_row("leakage pairs / test ids", "", "", f"{s['leakage_pairs']} / {s['leaked_test_ids']}")
    table.add_row("label-conflict groups", str(s["label_conflict_groups"]), "", "")
    table.add_row(
        "duplicate groups (ids; largest)",
        f"{s['duplicate_groups']} ({s['grouped_train_ids']}; {s['largest_group']})",
        "",
        "",
    )
    console.print(table)
    if s["pairs_truncated"]:
        console.print(f"[yellow]pair listings cut at {s['max_pairs']:,} rows[/] (groups are complete).")
    if s["largest_group"] > max(20, 0.01 * s["images"]["train"]):
        console.print(
            f"[yellow]one duplicate group holds {s['largest_group']} train images[/]: look at "
            "identical_classes.csv and near_duplicates.csv; if they are look-alikes, not copies, raise "
            "--min-similarity or lower --threshold."
        )
    console.print(f"written to {out}/ (unreadable.csv and groups.csv are read by `kpipe folds`)")
