"""Duplicate pairing and grouping over perceptual hashes and thumbnails (used by `kpipe audit`).

Near duplicates are pairs within a pHash Hamming distance that ALSO correlate as thumbnails:
pHash alone joins different but similar-looking images (thousands of MNIST 1s), which would
merge unrelated images into one giant fold group. Train duplicates become groups (connected
components) that `kpipe folds` keeps inside one fold.

Usage: ``g = dup_graph(phashes, thumbs, threshold=6, min_similarity=0.97); groups = connected_groups(ids, *train_group_edges(g, is_train))``
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

MAX_PAIRS = (
    2_000_000  # cap on listed pairs (a few thousand blank images would make millions); groups stay exact
)
BIG_CLASS = 64  # an identical class larger than this is listed as a star (n - 1 pairs), not all n^2 / 2


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)


def hash_pairs(
    hashes: np.ndarray, threshold: int, block_elems: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All index pairs i < j with Hamming(hashes[i], hashes[j]) <= threshold, and the distances.

    Brute force over the upper triangle in row blocks: O(U^2/2) vectorised XOR + popcount for
    U hashes (5e9 for U = 100k: ~20 s on one core) in O(block_elems) memory. Exact for
    any threshold; band bucketing needs threshold+1 bands of ~9 bits at threshold 6 and its
    buckets skew on real hashes.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    out_i, out_j, out_d = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.uint8)]
    start = 0
    while start < n:
        rows = max(1, block_elems // (n - start))
        dist = popcount64(h[start : start + rows, None] ^ h[None, start:])
        ii, jj = np.nonzero(dist <= threshold)
        keep = jj > ii  # columns begin at `start` too, so this is j > i
        out_i.append(ii[keep] + start)
        out_j.append(jj[keep] + start)
        out_d.append(dist[ii[keep], jj[keep]].astype(np.uint8))
        start += rows
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def similarity(thumbs: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Pearson correlation of thumbnails a[k] and b[k] (0 where one is flat), in chunks of pairs."""
    t = _rows(thumbs)
    out = np.empty(len(a), dtype=np.float32)
    for s in range(0, len(a), chunk):
        x = t[a[s : s + chunk]].astype(np.float32)
        y = t[b[s : s + chunk]].astype(np.float32)
        x -= x.mean(1, keepdims=True)
        y -= y.mean(1, keepdims=True)
        den = np.sqrt((x * x).sum(1) * (y * y).sum(1))
        out[s : s + chunk] = np.where(den > 0, (x * y).sum(1) / np.maximum(den, 1e-12), 0.0)
    return out


def _rows(thumbs: np.ndarray) -> np.ndarray:
    t = np.ascontiguousarray(thumbs, dtype=np.uint8)
    return t.reshape(len(t), int(np.prod(t.shape[1:], dtype=np.int64)))  # (N, 1024), also for N = 0


@dataclass(frozen=True)
class DupGraph:
    """Items in classes of identical thumbnail, and the class pairs that are near duplicates."""

    inverse: np.ndarray  # item -> class
    members: list[np.ndarray]  # class -> its items, ascending
    ci: np.ndarray  # near-duplicate class pairs ci < cj ...
    cj: np.ndarray
    cd: np.ndarray  # ... their pHash distance
    cs: np.ndarray  # ... and thumbnail correlation


def dup_graph(phashes: np.ndarray, thumbs: np.ndarray, threshold: int, min_similarity: float) -> DupGraph:
    """Near duplicates: pHash within `threshold` bits, confirmed by thumbnail correlation.

    pHash alone joins look-alikes on plain backgrounds: on the MNIST demo, threshold 6 links
    58%-label-agreeing pairs into one component of 1,766 of 4,000 train images. Re-encoded,
    resized, blurred or brightened copies keep a thumbnail correlation >= 0.98; those
    look-alikes mostly do not. Identical thumbnails form one class, compared once.
    """
    t = _rows(thumbs)
    _, first, inverse = np.unique(t, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inverse))[:-1]) if len(order) else []
    ci, cj, cd = hash_pairs(np.asarray(phashes, dtype=np.uint64)[first], threshold)
    cs = similarity(t[first], ci, cj)
    ok = cs >= min_similarity
    return DupGraph(inverse, members, ci[ok], cj[ok], cd[ok], cs[ok])


def expand_pairs(
    g: DupGraph, max_pairs: int = MAX_PAIRS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Item pairs (a < b) that are duplicates: (a, b, distance, similarity, truncated).

    Listing stops at `max_pairs` (truncated=True): identical thumbnails first, then by distance.
    Memory is O(max_pairs + items), whatever the class sizes: a class of identical thumbnails larger
    than BIG_CLASS is listed as a star (its first member with each other member, n - 1 pairs, not
    n^2 / 2; the audit's identical_classes.csv lists it once with its size), and each piece is cut to the pairs
    still allowed before it is built.
    """
    chunks: list[tuple[np.ndarray, np.ndarray, int, float]] = []
    count, truncated = 0, False
    pieces = [(m, None, 0, 1.0) for m in g.members if len(m) > 1]
    pieces += [
        (g.members[g.ci[k]], g.members[g.cj[k]], int(g.cd[k]), float(g.cs[k]))
        for k in np.argsort(g.cd, kind="stable")
    ]
    for mi, mj, dist, sim in pieces:
        if count >= max_pairs:
            truncated = True
            break
        a, b, n = (
            _class_pairs(mi, max_pairs - count) if mj is None else _cross_pairs(mi, mj, max_pairs - count)
        )
        truncated |= n > len(a)
        chunks.append((a, b, dist, sim))
        count += len(a)
    x = np.concatenate([np.empty(0, np.int64)] + [c[0] for c in chunks])
    y = np.concatenate([np.empty(0, np.int64)] + [c[1] for c in chunks])
    d = np.concatenate([np.empty(0, np.uint8)] + [np.full(len(c[0]), c[2], np.uint8) for c in chunks])
    s = np.concatenate([np.empty(0, np.float32)] + [np.full(len(c[0]), c[3], np.float32) for c in chunks])
    return np.minimum(x, y), np.maximum(x, y), d, s, truncated


def _class_pairs(m: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(a, b, pairs to list) inside one identical class, at most `limit` built: all pairs up to BIG_CLASS
    members, else the star from its first member."""
    if len(m) > BIG_CLASS:
        rest = m[1 : 1 + limit]
        return np.full(len(rest), m[0], np.int64), rest, len(m) - 1
    a, b = np.triu_indices(len(m), 1)  # at most BIG_CLASS^2 / 2 pairs
    return m[a[:limit]], m[b[:limit]], len(a)


def _cross_pairs(mi: np.ndarray, mj: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(a, b, pairs to list) between two near-duplicate classes, at most `limit` built: every pair when both
    are small, else two stars (each class's first member with every member of the other)."""
    if len(mi) <= BIG_CLASS and len(mj) <= BIG_CLASS:
        a, b = np.repeat(mi, len(mj)), np.tile(mj, len(mi))  # at most BIG_CLASS^2 pairs
        return a[:limit], b[:limit], len(a)
    a = np.concatenate([np.full(len(mj), mi[0], np.int64), mi[1:]])
    b = np.concatenate([mj, np.full(len(mi) - 1, mj[0], np.int64)])
    return a[:limit], b[:limit], len(a)


def connected_groups(names: Sequence[str], a: np.ndarray, b: np.ndarray) -> list[str]:
    """Connected components over edges (a[k], b[k]); each item gets the smallest name in its component.

    Singletons are their own group; names make group ids deterministic and readable.
    """
    n = len(names)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (np.asarray(a), np.asarray(b))), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first: dict[int, str] = {}
    for c, name in zip(comp.tolist(), names, strict=True):
        first[c] = min(first.get(c, name), name)
    return [first[c] for c in comp.tolist()]


def train_group_edges(g: DupGraph, is_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining every train item to its train duplicates, exact and near.

    Built per class (chain its train members; link two near-duplicate classes through one
    train member each), so the components equal those of all pairs, without expanding them.
    """
    rep = np.full(len(g.members), -1, dtype=np.int64)  # first train member of each class
    a, b = [], []
    for idx in np.flatnonzero(is_train):
        c = g.inverse[idx]
        if rep[c] >= 0:
            a.append(rep[c])
            b.append(idx)
        else:
            rep[c] = idx
    both = (rep[g.ci] >= 0) & (rep[g.cj] >= 0)
    return (
        np.concatenate([np.asarray(a, np.int64), rep[g.ci[both]]]),
        np.concatenate([np.asarray(b, np.int64), rep[g.cj[both]]]),
    )


# ------------------------------------------------------------------ tables
