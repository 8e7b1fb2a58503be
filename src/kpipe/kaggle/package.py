"""The package format: trained runs turned into a Kaggle dataset that an internet-off notebook predicts from.

package/<name>/ holds kpipe_package.json (the spec: classes, class prior, runs and the TTA views and
blend weights `kpipe infer` uses for them, CV), config.yaml (the resolved config), classes.json,
runs/<tag>/{config.yaml, fold<k>.safetensors, fold<k>.json; full.* for a `kpipe train --full` model}
(weights with no pickle, and the checkpoint's classes / data_config / config beside them), check/
(validation images, each with the fold whose model checks with it: the notebook's infer.precision /
infer.runtime agreement checks), wheels/kpipe-*.whl, manifest.json (every file's size and sha256) and
dataset-metadata.json (Kaggle's). `read_spec` is how `kpipe infer`
(infer.package=DIR) reads one back; the rest is what `kpipe package` writes it with.
Usage: ``spec = read_spec(Path("package/b0-package")); spec.runs[0].tag``
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

import kpipe
from kpipe import paths
from kpipe.data import image
from kpipe.errors import KpipeError, preview
from kpipe.io import read_csv_ids, write_bytes, write_csv, write_json
from kpipe.kaggle.ledger import sha256_file
from kpipe.nn import checkpoint

FORMAT = 1
CHECK_MAX_ROWS = 10_000  # a check.csv longer than this is refused (a package is untrusted input)
CHECK_MAX_BYTES = 2 * 1024 * 1024  # ... and one larger than this is not even read
CHECK_JPEG_QUALITY = 95


@dataclass(frozen=True)
class PackagedRun:
    tag: str  # folder name under runs/
    source: str  # the run folder it was made from (for the reader; never opened from the package)
    folds: list[int]
    views: list[str]


@dataclass(frozen=True)
class PackageSpec:
    name: str
    classes: list[str]
    prior: list[float]  # class frequencies of the training labels: the guess for an unreadable image
    runs: list[PackagedRun]
    weights: list[dict[str, Any]] | None  # [{"run": tag, "view": v, "weight": w}] from `kpipe ensemble`
    how: str
    cv: float | None
    metric: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kpipe_version": kpipe.__version__,
            "name": self.name,
            "classes": self.classes,
            "prior": self.prior,
            "how": self.how,
            "cv": self.cv,
            "metric": self.metric,
            "runs": [
                {"tag": r.tag, "source": r.source, "folds": r.folds, "views": r.views} for r in self.runs
            ],
            "weights": self.weights,
        }


def read_spec(root: Path) -> PackageSpec:
    """The spec of a package folder, checked against the files it names (KpipeError naming what is missing)."""
    path = paths.PackageDir(root).spec
    if not path.is_file():
        raise KpipeError(f"{path}: not found. infer.package must name a folder written by `kpipe package`.")
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("format") != FORMAT:
        raise KpipeError(
            f"{path}: package format {raw.get('format')!r}, this kpipe reads {FORMAT}. "
            "Write the package again with this kpipe (`kpipe package`)."
        )
    runs = [
        PackagedRun(r["tag"], r["source"], [int(k) for k in r["folds"]], list(r["views"]))
        for r in raw["runs"]
    ]
    for r in runs:
        for k in r.folds:
            weights = paths.package_weights(paths.PackageDir(root).run(r.tag), k)
            if not weights.is_file():
                raise KpipeError(
                    f"{weights}: missing; {path} lists fold {k} of run {r.tag}. "
                    "Write the package again with `kpipe package`."
                )
    return PackageSpec(
        raw["name"],
        list(raw["classes"]),
        [float(p) for p in raw["prior"]],
        runs,
        raw["weights"],
        raw["how"],
        raw["cv"],
        raw["metric"],
    )


def export_fold(best_pt: Path, run_root: Path, k: int) -> None:
    """fold<k>/best.pt -> fold<k>.safetensors (the model's tensors) + fold<k>.json (classes, data_config, config)."""
    from safetensors.torch import save_file

    ck = checkpoint.load(best_pt)
    tensors = {name: t.detach().cpu().contiguous() for name, t in ck["model"].items()}
    run_root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(paths.package_weights(run_root, k)))
    meta = {
        "classes": list(ck.get("classes", [])),
        "data_config": ck.get("data_config"),
        "config": ck.get("config"),
        "epoch": ck.get("epoch"),
        "score": ck.get("score"),
        "source": str(best_pt),
    }
    write_json(paths.package_fold_json(run_root, k), checkpoint.to_plain(meta))


def write_check_images(files_by_fold: dict[int, list[str]], root: Path, size: int) -> int:
    """Each fold's validation images, resized to size x size (the eval resize) and saved as JPEG in check/,
    listed with their fold in check/check.csv: what the notebook checks reduced precision or OpenVINO against
    fp32 with, on Kaggle's own hardware. Unreadable images are skipped. Returns how many were written."""
    import cv2

    where = paths.PackageDir(root)
    rows = []
    for k, files in sorted(files_by_fold.items()):
        for j, f in enumerate(files):
            try:
                rgb = image.resize_square(image.read_rgb(f), size)
            except KpipeError:  # image.ImageReadError
                continue  # the check needs realistic images, not every one
            ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, CHECK_JPEG_QUALITY])
            if ok:
                name = f"{paths.package_model_name(k)}_{j:05d}.jpg"
                write_bytes(where.check_dir / name, buf.tobytes())
                rows.append((name, k))
    if rows:
        write_csv(where.check_csv, pd.DataFrame(rows, columns=["file", "fold"]))
    return len(rows)


def read_check(root: Path) -> pd.DataFrame:
    """check/check.csv of a package as (path, fold), every file a plain name inside check/ (no links, no
    '..'): a downloaded package is untrusted. KpipeError says what is missing or wrong."""
    where = paths.PackageDir(root)
    if not where.check_csv.is_file():
        raise KpipeError(
            f"{where.check_csv}: not in the package (made with package.check_images=0, or by an older kpipe); "
            "write it again with `kpipe package` for the agreement checks to run."
        )
    size = where.check_csv.stat().st_size
    if size > CHECK_MAX_BYTES:
        raise KpipeError(
            f"{where.check_csv}: {size:,} bytes, over the {CHECK_MAX_BYTES:,} a list of {CHECK_MAX_ROWS:,} check "
            "images needs; not read. Write the package again with `kpipe package`."
        )
    df = read_csv_ids(where.check_csv)
    if list(df.columns) != ["file", "fold"] or len(df) > CHECK_MAX_ROWS:
        raise KpipeError(
            f"{where.check_csv}: expected columns file, fold and at most {CHECK_MAX_ROWS:,} rows; got "
            f"{list(df.columns)} and {len(df):,} rows."
        )
    folds = pd.to_numeric(df["fold"], errors="coerce")
    bad = [
        str(name)
        for name, k in zip(df["file"], folds, strict=True)
        if not (
            re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", str(name))
            and k >= paths.FULL_FOLD
            and float(k).is_integer()
        )
        or (where.check_dir / str(name)).is_symlink()
        or not (where.check_dir / str(name)).is_file()
    ]
    if bad:
        raise KpipeError(
            f"{where.check_csv}: rows that name no plain file inside {where.check_dir} or no fold number: "
            f"{preview(bad)}."
        )
    return pd.DataFrame(
        {"path": [str(where.check_dir / str(n)) for n in df["file"]], "fold": folds.astype(int)}
    )


def read_fold_classes(run_root: Path, k: int) -> list[str]:
    return list(json.loads(paths.package_fold_json(run_root, k).read_text(encoding="utf-8"))["classes"])


def manifest(root: Path, skip: tuple[str, ...] = ("manifest.json",)) -> dict[str, Any]:
    """Every file under root with its size and sha256, and a sha256 of the whole (the list's own hash)."""
    files = [
        {"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in skip
    ]
    whole = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"files": files, "bytes": sum(f["bytes"] for f in files), "sha256": whole}


def size_breakdown(files: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """Bytes per top part of the package (runs/<tag>, wheels, the rest), largest first."""
    parts: dict[str, int] = {}
    for f in files:
        bits = f["path"].split("/")
        key = (
            "/".join(bits[:2])
            if bits[0] == "runs" and len(bits) > 2
            else (bits[0] if len(bits) > 1 else "(top)")
        )
        parts[key] = parts.get(key, 0) + int(f["bytes"])
    return sorted(parts.items(), key=lambda kv: -kv[1])


def kaggle_slug_of(name: str, key: str) -> str:
    """Kaggle's slug rule for datasets and notebooks (5-50 of a-z, 0-9, '-') applied to a name; `key` sets it."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not 5 <= len(slug) <= 50:
        raise KpipeError(
            f"{key} {name!r} gives the Kaggle slug {slug!r}; Kaggle wants 5 to 50 letters, digits "
            f"or '-'. Set {key}=<a longer or shorter name>."
        )
    return slug


def dataset_metadata(owner: str, slug: str, title: str, license_name: str) -> dict[str, Any]:
    """Kaggle's dataset-metadata.json: `kaggle datasets create -p DIR` reads it."""
    if not 6 <= len(title) <= 50:
        raise KpipeError(f"package.title {title!r}: Kaggle wants a dataset title of 6 to 50 characters.")
    return {"title": title, "id": f"{owner}/{slug}", "licenses": [{"name": license_name}]}


def source_root() -> Path:
    """The kpipe checkout this process runs from (pyproject.toml + src/kpipe), which the wheel is built from."""
    root = Path(kpipe.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "src" / "kpipe").is_dir():
        raise KpipeError(
            f"kpipe runs from {Path(kpipe.__file__).parent}, not from a checkout with pyproject.toml: "
            "`kpipe package` builds its wheel from the source. Run it from the repository "
            "(pip install -e .)."
        )
    return root


def dependency_specs(names: list[str]) -> list[str]:
    """'name<range>' for each named distribution, with kpipe's own range from pyproject.toml (none if not listed)."""
    import tomllib

    deps = tomllib.loads((source_root() / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "dependencies"
    ]
    ranges = {}
    for dep in deps:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*([^;#]*)", dep)
        if m:
            ranges[m[1].lower()] = m[2].strip()
    return [f"{n}{ranges.get(n.lower(), '')}" for n in names]


def download_wheels(specs: list[str], out_dir: Path, python: str, platforms: list[str]) -> list[Path]:
    """Binary wheels of `specs` (no dependencies of theirs) for the Kaggle image's Python and platform."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "-d",
        str(out_dir),
        "-q",
        "--disable-pip-version-check",
    ]
    for p in platforms:
        cmd += ["--platform", p]
    done = subprocess.run(cmd + specs, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KpipeError(
            f"downloading wheels for package.bundle_deps {specs} failed (pip download exit "
            f"{done.returncode}):\n{(done.stderr or done.stdout).strip()[-1500:]}\nCheck the names, "
            "package.python / package.platform, and the network to the package index."
        )
    return sorted(out_dir.glob("*.whl"))


def build_wheel(out_dir: Path) -> Path:
    """A kpipe wheel (no dependencies) built from a clean copy of the checkout, so no build/ lands in it."""
    root = source_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kpipe-wheel-") as tmp:
        src = Path(tmp) / "src"
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, src / name)
        shutil.copytree(
            root / "src" / "kpipe",
            src / "src" / "kpipe",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        dist = Path(tmp) / "dist"
        env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-q",
                "-w",
                str(dist),
                str(src),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        wheels = sorted(dist.glob("kpipe-*.whl"))
        if done.returncode != 0 or not wheels:
            raise KpipeError(
                f"building the kpipe wheel failed (pip wheel exit {done.returncode}):\n"
                f"{(done.stderr or done.stdout).strip()[-2000:]}\nIs setuptools installed in this "
                "environment? (`pip wheel --no-build-isolation` uses the installed one.)"
            )
        target = out_dir / wheels[0].name
        shutil.copy2(wheels[0], target)
    return target
