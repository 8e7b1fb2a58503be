"""Decoding: every pixel format read_rgb meets gives the expected RGB, and bad files fail clearly."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from kpipe.data import image
from kpipe.data.image import ImageReadError, probe, read_rgb

RED, GREEN, BLUE, OLIVE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 50)


def quadrants(h: int = 16, w: int = 24) -> np.ndarray:
    """Four flat colours, so orientation and channel order are easy to check (and JPEG-safe)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2 :] = RED, GREEN
    a[h // 2 :, : w // 2], a[h // 2 :, w // 2 :] = BLUE, OLIVE
    return a


def centre_colours(rgb: np.ndarray) -> list[tuple[int, ...]]:
    h, w = rgb.shape[:2]
    pts = [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]
    return [tuple(int(v) for v in rgb[y, x]) for y, x in pts]


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_rgb_png_exact(tmp_path: Path) -> None:
    a = quadrants()
    Image.fromarray(a).save(tmp_path / "a.png")
    out = read_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, a)


def test_16bit_rgb_and_gray_drop_low_byte(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = quadrants()
    a16 = a.astype(np.uint16) * 256 + rng.integers(0, 256, a.shape, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), a16[:, :, ::-1])  # OpenCV writes BGR
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgb16.png"), a)
    g16 = (np.arange(16 * 16, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    expect = np.repeat((g16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(read_rgb(tmp_path / "g16.png"), expect)
    info = probe(tmp_path / "rgb16.png")
    assert (info["bits"], info["width"], info["height"]) == (16, 24, 16)
    assert probe(tmp_path / "g16.png")["bits"] == 16


def test_gray_and_bilevel_become_rgb(tmp_path: Path) -> None:
    g = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(g).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "g.png"), np.repeat(g[:, :, None], 3, axis=2))
    bits = (g % 2).astype(bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    out = read_rgb(tmp_path / "b.png")
    np.testing.assert_array_equal(out[:, :, 0], np.where(bits, 255, 0))


def test_alpha_composited_on_white(tmp_path: Path) -> None:
    a = quadrants()
    alpha = np.zeros(a.shape[:2], np.uint8)
    alpha[:, 12:] = 255
    alpha[8:, :12] = 128
    Image.fromarray(np.dstack([a, alpha])).save(tmp_path / "rgba.png")
    out = read_rgb(tmp_path / "rgba.png")
    assert tuple(out[2, 2]) == (255, 255, 255)  # fully transparent red -> white
    assert tuple(out[2, 20]) == GREEN and tuple(out[12, 20]) == OLIVE  # opaque kept
    expect_blue = tuple((c * 128 + 255 * 127 + 127) // 255 for c in BLUE)
    assert tuple(out[12, 2]) == expect_blue  # half transparent blue over white
    la = Image.fromarray(np.dstack([a[:, :, 1], alpha]), mode="LA")
    la.save(tmp_path / "la.png")
    assert tuple(read_rgb(tmp_path / "la.png")[2, 2]) == (255, 255, 255)


def test_palette_png_with_and_without_transparency(tmp_path: Path) -> None:
    a = quadrants()
    pal = Image.fromarray(a).quantize(colors=4)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "p.png"), a)
    red_index = int(np.asarray(pal)[0, 0])
    pal.save(tmp_path / "pt.png", transparency=red_index)
    out = read_rgb(tmp_path / "pt.png")
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 23]) == GREEN


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.fromarray(quadrants()).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert probe(tmp_path / "c.jpg")["mode"] == "CMYK"
    out = read_rgb(tmp_path / "c.jpg")
    ref = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB"))
    assert out.shape == ref.shape
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 4
    assert all(close(c, e) for c, e in zip(centre_colours(out), [RED, GREEN, BLUE, OLIVE], strict=True))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(tmp_path: Path, orientation: int) -> None:
    im = Image.fromarray(quadrants())
    exif = im.getexif()
    exif[image.EXIF_ORIENTATION] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    im.save(path, quality=95, exif=exif)
    out = read_rgb(path)
    ref = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert out.shape == ref.shape
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 8
    info = probe(path)
    assert (info["height"], info["width"], info["orientation"]) == (*out.shape[:2], orientation)


def test_exif_orientation_6_3_8_pixels(tmp_path: Path) -> None:
    # Stored image: red top-left, green top-right, blue bottom-left, olive bottom-right.
    expected = {6: [BLUE, RED, OLIVE, GREEN], 3: [OLIVE, BLUE, GREEN, RED], 8: [GREEN, OLIVE, RED, BLUE]}
    for orientation, colours in expected.items():
        im = Image.fromarray(quadrants())
        exif = im.getexif()
        exif[image.EXIF_ORIENTATION] = orientation
        im.save(tmp_path / "x.jpg", quality=95, exif=exif)
        out = read_rgb(tmp_path / "x.jpg")
        assert out.shape[:2] == ((24, 16) if orientation != 3 else (16, 24))
        assert all(close(c, e) for c, e in zip(centre_colours(out), colours, strict=True)), orientation


def test_unicode_and_space_path(tmp_path: Path) -> None:
    folder = tmp_path / "café dir"
    folder.mkdir()
    Image.fromarray(quadrants()).save(folder / "ñame 01.png")
    np.testing.assert_array_equal(read_rgb(folder / "ñame 01.png"), quadrants())


def test_other_formats(tmp_path: Path) -> None:
    for ext in ("bmp", "webp", "gif", "tif"):
        Image.fromarray(quadrants()).save(
            tmp_path / f"a.{ext}", **({"lossless": True} if ext == "webp" else {})
        )
        out = read_rgb(tmp_path / f"a.{ext}")
        assert all(
            close(c, e, 2) for c, e in zip(centre_colours(out), [RED, GREEN, BLUE, OLIVE], strict=True)
        ), ext


def _big_jpeg(tmp_path: Path) -> bytes:
    rng = np.random.default_rng(0)
    noise = cv2.resize(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), (400, 300))
    Image.fromarray(noise).save(tmp_path / "big.jpg", quality=90)
    return (tmp_path / "big.jpg").read_bytes()


def test_bad_files_raise(tmp_path: Path) -> None:
    data = _big_jpeg(tmp_path)
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) * 3 // 4])
    png = tmp_path / "n.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    (tmp_path / "trunc.png").write_bytes(png.read_bytes()[:-200])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not really a png", encoding="utf-8")
    (tmp_path / "folder.png").mkdir()
    cases = {
        "missing.jpg": "not found",
        "empty.jpg": "empty",
        "trunc.jpg": "truncated JPEG",
        "trunc.png": "truncated PNG",
        "text.png": "not an image",
        "folder.png": "folder",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageReadError, match=reason) as err:
            read_rgb(tmp_path / name)
        assert err.value.path == str(tmp_path / name)
    with pytest.raises(ImageReadError):
        probe(tmp_path / "text.png")


def test_jpeg_end_check(tmp_path: Path) -> None:
    data = _big_jpeg(tmp_path)
    assert image._jpeg_has_end(data)
    assert not image._jpeg_has_end(data[:-2])
    # Bytes after the end marker (phone trailers) are fine.
    (tmp_path / "trailer.jpg").write_bytes(data + b"SEFT" * 100)
    assert read_rgb(tmp_path / "trailer.jpg").shape == (300, 400, 3)
    # An APP1 segment holding a complete thumbnail JPEG must not vouch for a cut main image.
    thumb = tmp_path / "t.jpg"
    Image.fromarray(quadrants()).save(thumb)
    payload = b"Exif\x00\x00" + thumb.read_bytes()
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    with_thumb = data[:2] + app1 + data[2:]
    assert image._jpeg_has_end(with_thumb)
    assert not image._jpeg_has_end(with_thumb[: len(with_thumb) * 3 // 4])
    (tmp_path / "thumb_ok.jpg").write_bytes(with_thumb)
    assert read_rgb(tmp_path / "thumb_ok.jpg").shape == (300, 400, 3)


def test_resize_square() -> None:
    a = quadrants(40, 60)
    out = image.resize_square(a, 20)
    assert out.shape == (20, 20, 3)
    assert image.resize_square(out, 20) is out
