"""Image decoding: every image kpipe reads becomes an (H, W, 3) uint8 RGB array here.

OpenCV decodes (fast, releases the GIL); the file is read with Python and handed to
`cv2.imdecode`, so unicode and spaces in paths work on every OS. Decoding uses
`IMREAD_UNCHANGED` to keep 16-bit depth and alpha, which also makes OpenCV ignore EXIF
orientation, so the orientation tag is read with PIL (header only, ~25 us) and applied here.
Truncated JPEG/PNG files are caught by a cheap end-marker check (~1 us), because some
OpenCV builds return a partly grey image for them instead of failing. Memory is bounded: the
header's width x height is checked against `max_pixels()` (default 100 megapixels, environment
variable KPIPE_MAX_PIXELS) before any pixel is decoded, since a 24 KB PNG can claim 40000 x 40000;
every decoder failure, OpenCV's cv2.error included, is an ImageReadError (infer: the class prior).
Usage: ``rgb = read_rgb("data/comp/train/001.jpg")``; ``info = probe(path)``.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from kpipe.errors import KpipeError

# DataLoader workers each decode one image at a time; OpenCV's own thread pool in every worker
# would oversubscribe the cores (workers x threads) and its pool does not survive fork() well.
# Parallelism comes from processes/threads above OpenCV instead.
cv2.setNumThreads(1)

DEFAULT_MAX_PIXELS = 100_000_000  # 100 Mpx: 300 MB as RGB uint8; the largest real photos are ~50 Mpx
EXIF_ORIENTATION = 0x0112
_JPEG_SOI = b"\xff\xd8"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


class ImageReadError(KpipeError):
    """A file that cannot be turned into pixels; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str | None = None) -> None:
        if reason is None:  # torch's DataLoader rebuilds a worker's error from its traceback text alone
            last = (
                str(path).rstrip().splitlines()[-1]
            )  # "kpipe.data.image.ImageReadError: <file>: cannot read image: <why>"
            path, _, reason = last.split(": ", 1)[-1].partition(": cannot read image: ")
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: cannot read image: {reason}")


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode `path` into a contiguous (H, W, 3) uint8 RGB array, upright per its EXIF orientation.

    16-bit images are scaled to 8 bits by dropping the low byte (>>8; full-range 16-bit data
    assumed). Gray and palette images become RGB. Images with an alpha channel (RGBA, LA,
    palette with transparency) are composited on white, so transparent areas look the way a
    viewer shows them, not whatever colour the hidden pixels hold. CMYK JPEGs are converted
    by OpenCV. Raises ImageReadError for missing, empty, truncated or non-image files.
    """
    buf = _read_bytes(path)
    _check_complete(path, buf)
    _check_pixels(path, buf)
    try:
        arr = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            arr = _decode_with_pil(path, buf)  # formats this OpenCV build lacks (e.g. GIF on old builds)
        else:
            if arr.shape[0] * arr.shape[1] > max_pixels():  # a format whose header PIL could not read
                raise ImageReadError(
                    path,
                    f"too large: {arr.shape[1]} x {arr.shape[0]} pixels, over the limit of "
                    f"{max_pixels():,} (set KPIPE_MAX_PIXELS to raise it)",
                )
            arr = _to_rgb8(path, arr)
    except cv2.error as e:  # e.g. a size OpenCV's own limit refuses, or data its codec chokes on
        raise ImageReadError(path, f"OpenCV cannot decode it ({_first_line(e)})") from None
    except MemoryError:
        raise ImageReadError(path, "out of memory while decoding it") from None
    return np.ascontiguousarray(apply_orientation(arr, _orientation(buf)))


def read_plain_jpeg(path: str | os.PathLike[str]) -> bytes | None:
    """The file's bytes when a JPEG decoder alone gives read_rgb's pixels (data.device_decode): a complete
    JPEG, colour (YCbCr) or gray, within max_pixels(), no EXIF rotation. None for any other image (CMYK, PNG,
    a rotated photo, ...), which read_rgb decodes. Raises ImageReadError as read_rgb does for a missing,
    empty, truncated or too large file."""
    buf = _read_bytes(path)
    if not buf.startswith(_JPEG_SOI):
        return None
    _check_complete(path, buf)
    _check_pixels(path, buf)
    try:
        with Image.open(io.BytesIO(buf)) as im:
            plain = im.format == "JPEG" and im.mode in ("RGB", "L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return None  # read_rgb's decoders judge it
    return buf if plain and _orientation(buf) == 1 else None


def max_pixels() -> int:
    """Largest width x height read_rgb decodes: KPIPE_MAX_PIXELS (an integer), else DEFAULT_MAX_PIXELS."""
    raw = os.environ.get("KPIPE_MAX_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise KpipeError(f"KPIPE_MAX_PIXELS={raw!r}: expected a number of pixels, e.g. 100000000.") from None
    if value <= 0:
        raise KpipeError(f"KPIPE_MAX_PIXELS={raw!r}: must be positive.")
    return value


def _check_pixels(path: str | os.PathLike[str], buf: bytes) -> None:
    """Refuse an image whose header claims more than max_pixels(), before decoding it.

    PIL's open reads only the header (lazy). Formats PIL does not identify fall through to the
    decoders, which refuse what they cannot read; the result is checked again after decoding.
    """
    limit = max_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(buf)) as im:
                width, height = im.size
    except Image.DecompressionBombError as e:  # PIL's own refusal (> 179 Mpx) also comes from the header
        raise ImageReadError(
            path, f"too large: {_first_line(e)}; the limit is {limit:,} pixels (KPIPE_MAX_PIXELS)"
        ) from None
    # Anything else PIL cannot make of the header is for the decoders below to judge.
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return
    if width * height > limit:
        raise ImageReadError(
            path,
            f"too large: {width} x {height} = {width * height:,} pixels, over the limit of "
            f"{limit:,} (set KPIPE_MAX_PIXELS to raise it)",
        )


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    if not p.exists():
        raise ImageReadError(path, "file not found")
    if p.is_dir():
        raise ImageReadError(path, "is a folder, not a file")
    buf = p.read_bytes()
    if not buf:
        raise ImageReadError(path, "file is empty (0 bytes)")
    return buf


def _check_complete(path: str | os.PathLike[str], buf: bytes) -> None:
    if buf.startswith(_JPEG_SOI) and not _jpeg_has_end(buf):
        raise ImageReadError(path, "truncated JPEG (no end-of-image marker after the image data)")
    if buf.startswith(_PNG_SIG) and buf.rfind(b"IEND") < len(_PNG_SIG):
        raise ImageReadError(path, "truncated PNG (no IEND chunk)")


def _jpeg_has_end(buf: bytes) -> bool:
    """True if an end-of-image marker follows the first scan.

    Walks the marker segments up to the first start-of-scan, skipping APPn segments by their
    length: an EXIF thumbnail inside APP1 is a whole JPEG with its own end marker, and
    must not vouch for a main image cut short. Data after the end marker (phone trailers,
    MPO second frames) is allowed.
    """
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:  # garbage between segments: libjpeg tolerates it, so do we
            break
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers, no length
            i += 2
        elif marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        else:
            i += 2 + int.from_bytes(buf[i + 2 : i + 4], "big")
    return buf.rfind(b"\xff\xd9", i) != -1


def _to_rgb8(path: str | os.PathLike[str], arr: np.ndarray) -> np.ndarray:
    """OpenCV's BGR/BGRA/gray array of any supported depth -> (H, W, 3) uint8 RGB."""
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageReadError(path, f"unsupported pixel type {arr.dtype} (only 8- and 16-bit images)")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    channels = arr.shape[2]
    # cv2.cvtColor, not numpy: copying the reversed-channel view arr[:, :, ::-1] into a contiguous
    # array cost 0.64 ms per 500x375 image, as much as decoding it; cvtColor takes 0.1 ms.
    if channels == 1:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    if channels == 2:  # gray + alpha
        return _on_white(np.repeat(arr[:, :, :1], 3, axis=2), arr[:, :, 1])
    if channels == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return _on_white(cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB), arr[:, :, 3])
    raise ImageReadError(path, f"unsupported number of channels: {channels}")


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite uint8 `rgb` over white using uint8 `alpha` (exact integer rounding)."""
    a = alpha.astype(np.uint16)[:, :, None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _decode_with_pil(path: str | os.PathLike[str], buf: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(buf)) as im:
            if im.width * im.height > max_pixels():  # a format only PIL knows: checked before decoding too
                raise ImageReadError(
                    path,
                    f"too large: {im.width} x {im.height} pixels, over the limit of "
                    f"{max_pixels():,} (set KPIPE_MAX_PIXELS to raise it)",
                )
            rgba = np.asarray(im.convert("RGBA"))
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (or a format neither OpenCV nor PIL decodes)") from None
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"too large: {_first_line(e)}") from None
    except MemoryError:
        raise ImageReadError(path, "out of memory while decoding it") from None
    # PIL says "corrupt" with many exception types (OSError, ValueError, SyntaxError, struct.error, ...);
    # each is a finding about this file, reported with the decoder's message.
    except Exception as e:
        raise ImageReadError(path, f"corrupt image ({type(e).__name__}: {e})") from None
    return _on_white(rgba[:, :, :3], rgba[:, :, 3])


def _orientation(buf: bytes) -> int:
    """EXIF orientation (1-8) from the file header; 1 when absent or unreadable.

    Best effort on purpose: the pixels are already decoded, and a broken EXIF block should
    not make a good image unreadable.
    """
    try:
        with Image.open(io.BytesIO(buf)) as im:
            value = im.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a stored (H, W, C) array upright for EXIF `orientation` (same result as PIL's exif_transpose)."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(arr, k=-1)
    if orientation == 7:
        return arr.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(arr, k=1)
    return arr


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize to (size, size) with cv2.INTER_AREA: the one resize the cache and eval transform share."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def probe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Cheap header read for audits: {width, height, mode, bits, orientation, format}.

    width/height are as displayed (after EXIF orientation), i.e. the shape read_rgb returns.
    mode is PIL's ("RGB", "L", "RGBA", "P", "CMYK", "I;16", ...); bits is per channel.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(path, "file not found")
    if p.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    try:
        with Image.open(p) as im:
            width, height, mode, fmt = im.width, im.height, im.mode, im.format
            rawmode = str(im.tile[0][3]) if im.tile else ""
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (or a format PIL does not know)") from None
    except Image.DecompressionBombError as e:  # PIL refuses even to read the header of > 179 Mpx images
        raise ImageReadError(path, f"too large to probe safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(path, f"corrupt image header ({e})") from None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return {
        "width": width,
        "height": height,
        "mode": mode,
        "bits": _bits(mode, rawmode),
        "orientation": orientation if isinstance(orientation, int) else 1,
        "format": fmt,
    }


def _bits(mode: str, rawmode: str) -> int:
    # PIL opens 48/64-bit PNGs as 8-bit "RGB"/"RGBA"; the tile's raw mode ("RGB;16B") keeps the truth.
    if mode.startswith("I;16") or ";16" in rawmode:
        return 16
    return {"1": 1, "I": 32, "F": 32}.get(mode, 8)
