"""infer.decode=gpu's loader (data.device_decode), run on the CPU: the same batches as the CPU eval loader.

torchvision decodes on the device it is given; on the CPU that is libjpeg-turbo, as OpenCV's, so the pixels
before the resize are identical and the device-side INTER_AREA resize is within one level of cv2's.
What nvJPEG on a GPU gives is not measured here (no GPU in the test environment).
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from kpipe.data import device_decode
from kpipe.data.image import ImageReadError, read_plain_jpeg, resize_square
from kpipe.nn import predict

CPU = torch.device("cpu")
DC = {"img_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}


def _photo(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth RGB image with texture (JPEG error stays small), deterministic."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (max(h // 8, 2), max(w // 8, 2), 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(path: Path, rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1] if rgb.ndim == 3 else rgb, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    path.write_bytes(buf.tobytes())
    return str(path)


def _mixed_files(d: Path) -> tuple[list[str], dict[str, str]]:
    """JPEGs of several sizes with a PNG, a gray JPEG, an EXIF-rotated one, a CMYK one, two whose scan data the
    JPEG decoder refuses (one OpenCV still decodes, one nothing does), a truncated one and a missing file."""
    files = [_jpeg(d / f"j{i}.jpg", _photo(i, 40 + 7 * i, 64 - 3 * i)) for i in range(6)]
    files.append(_jpeg(d / "small.jpg", _photo(10, 20, 24)))  # grows to 32 px
    cv2.imwrite(str(d / "p.png"), _photo(11, 50, 40))
    files.insert(2, str(d / "p.png"))
    files.append(_jpeg(d / "gray.jpg", _photo(12, 48, 48)[:, :, 0]))
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_photo(13, 40, 60)).save(buf, "JPEG", exif=exif.tobytes())
    (d / "rot.jpg").write_bytes(buf.getvalue())
    files.append(str(d / "rot.jpg"))
    buf = io.BytesIO()
    Image.fromarray(_photo(14, 40, 40)).convert("CMYK").save(buf, "JPEG")
    (d / "cmyk.jpg").write_bytes(buf.getvalue())
    files.append(str(d / "cmyk.jpg"))
    good = bytearray(Path(files[0]).read_bytes())
    sos = good.find(b"\xff\xda")
    marked = bytearray(good)
    for k in range(sos + 20, len(marked) - 2, 3):  # markers all over the scan: libjpeg gives up, OpenCV not
        marked[k] = 0xFF
    (d / "marked.jpg").write_bytes(bytes(marked))
    dht = good.find(b"\xff\xc4")
    broken = bytearray(good)
    broken[dht + 5 : dht + 21] = b"\xff" * 16  # a Huffman table no decoder accepts
    (d / "broken.jpg").write_bytes(bytes(broken))
    (d / "cut.jpg").write_bytes(bytes(good[: len(good) // 2]))
    files[4:4] = [str(d / "marked.jpg"), str(d / "broken.jpg")]
    files += [str(d / "cut.jpg"), str(d / "missing.jpg")]
    return files, {"marked": str(d / "marked.jpg"), "broken": str(d / "broken.jpg")}


def _all(loader) -> tuple[torch.Tensor, list[int], list[bool]]:
    xs, ids, oks = [], [], []
    for x, y, idx, ok in loader:
        assert x.dtype == torch.uint8 and bool((y == -1).all())
        xs.append(x.cpu())
        ids += idx.tolist()
        oks += ok.tolist()
    return torch.cat(xs), ids, oks


@pytest.mark.parametrize(
    "h,w,size",
    [
        (375, 500, 224),  # shrinks: area weights
        (48, 64, 32),
        (64, 64, 32),  # a whole factor
        (37, 41, 32),
        (20, 30, 32),  # grows: OpenCV's linear weights
        (76, 50, 100),
        (272, 12, 24),  # shrinks one way, grows the other (float rounding of OpenCV's coefficients matters)
        (118, 10, 24),
        (100, 80, 224),
    ],
)
def test_resize_area_matches_opencv(h: int, w: int, size: int) -> None:
    rgb = _photo(h + w, h, w)
    ref = resize_square(rgb, size).astype(int)
    out = device_decode.resize_area(torch.from_numpy(rgb).permute(2, 0, 1), size).permute(1, 2, 0).numpy()
    assert out.shape == (size, size, 3)
    assert np.abs(out.astype(int) - ref).max() <= 1


@pytest.mark.parametrize("workers", [0, 1])
def test_device_loader_gives_the_cpu_loaders_batches(tmp_path: Path, workers: int) -> None:
    files, odd = _mixed_files(tmp_path)
    assert read_plain_jpeg(odd["marked"]) is not None and read_plain_jpeg(odd["broken"]) is not None
    assert read_plain_jpeg(files[2]) is None  # the PNG: decoded by the CPU path
    assert (
        read_plain_jpeg(str(tmp_path / "rot.jpg")) is None
        and read_plain_jpeg(str(tmp_path / "cmyk.jpg")) is None
    )
    cpu = predict.make_eval_loader(files, DC, 4, workers, CPU, tolerant=True)
    dev = predict.make_eval_loader(files, DC, 4, workers, CPU, tolerant=True, decode="gpu")
    assert (
        isinstance(dev, device_decode.DeviceDecodeLoader)
        and len(dev.dataset) == len(files) == len(dev) * 4 - 1
    )
    (xc, ic, okc), (xd, id_, okd) = _all(cpu), _all(dev)
    assert ic == id_ == list(range(len(files)))  # every row, in order: inference never drops one
    assert okc == okd
    bad = [Path(files[i]).name for i, ok in enumerate(okd) if not ok]
    assert bad == ["broken.jpg", "cut.jpg", "missing.jpg"]
    assert int((xc.int() - xd.int()).abs().max()) <= 1
    assert int((xd[[i for i, ok in enumerate(okd) if not ok]]).max()) == 0  # blank, as the CPU path


def test_device_loader_raises_as_the_cpu_loader_when_not_tolerant(tmp_path: Path) -> None:
    files, odd = _mixed_files(tmp_path)
    for decode in ("cpu", "gpu"):
        loader = predict.make_eval_loader([files[0], odd["broken"]], DC, 2, 0, CPU, False, decode)
        with pytest.raises(ImageReadError, match="broken.jpg"):
            _all(loader)


def test_choose_decode() -> None:
    cuda = torch.device("cuda")  # a device object only: choose_decode reads its type

    def rates(cpu: float, gpu: float):
        return lambda: {"cpu": cpu, "gpu": gpu}

    def never() -> None:
        raise AssertionError("timed where it should not be")

    assert predict.choose_decode("cpu", cuda, never).name == "cpu"
    assert predict.choose_decode("gpu", CPU, never).name == "gpu"
    auto_cpu = predict.choose_decode("auto", CPU, never)
    assert auto_cpu.name == "cpu" and "no CUDA" in auto_cpu.reason
    fast = predict.choose_decode("auto", cuda, rates(900.0, 2500.0))
    assert fast.name == "gpu" and fast.to_json() == {
        "decode": "gpu",
        "reason": fast.reason,
        "rates": {"cpu": 900.0, "gpu": 2500.0},
    }
    assert predict.choose_decode("auto", cuda, rates(900.0, 800.0)).name == "cpu"
    assert predict.choose_decode("auto", cuda, lambda: None).name == "cpu"


def test_decode_rates_times_both_decoders(tmp_path: Path) -> None:
    files = [_jpeg(tmp_path / f"{i}.jpg", _photo(i, 48, 64)) for i in range(12)]
    rates = predict.decode_rates(files, DC, 4, 0, CPU)
    assert rates is not None and set(rates) == {"cpu", "gpu"} and min(rates.values()) > 0
    assert predict.decode_rates(files[:8], DC, 4, 0, CPU) is None  # too few for two timed batches
