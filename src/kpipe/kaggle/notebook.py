"""The internet-off inference notebook of a code competition, written as JSON by code (no jupyter needed).

Its cells: find the package dataset and the competition under /kaggle/input; install the kpipe wheel
offline (pip --no-index --no-deps); print the versions of what kpipe needs and stop with a clear
message when one is missing or outside kpipe's range; run `python -m kpipe infer` with
infer.package pointing at the dataset (the same code path as a local `kpipe infer`); check
/kaggle/working/submission.csv against sample_submission. $KAGGLE_ROOT moves /kaggle (the dry-run's
simulated tree) and $KPIPE_PIP_TARGET installs the wheel into a folder instead of site-packages.
Usage: ``nb = render(NotebookSpec(...)); write_json(path, nb); script = as_script(nb)``
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# Distributions `kpipe infer` imports, with the module whose __version__ tells the installed version
# (Kaggle's image has opencv-python, not -headless: the module is what matters).
INFER_MODULES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "albumentations": "albumentations",
    "opencv-python-headless": "cv2",
    "numpy": "numpy",
    "pandas": "pandas",
    "scikit-learn": "sklearn",
    "scipy": "scipy",
    "pydantic": "pydantic",
    "pyyaml": "yaml",
    "rich": "rich",
    "safetensors": "safetensors",
    "filelock": "filelock",
    "pillow": "PIL",
}


@dataclass(frozen=True)
class NotebookSpec:
    package: str  # the package's name (kpipe_package.json "name"), how the notebook finds its dataset
    competition: str  # the Kaggle slug: /kaggle/input/<slug>/
    sample_submission: str  # file name inside the competition folder
    id_col: str | None  # sample_submission's id column (None: its first)
    requires: list[tuple[str, str, str]]  # (distribution, module, specifier)


def requirements(dependencies: list[str]) -> list[tuple[str, str, str]]:
    """(distribution, module, specifier) for each of kpipe's dependencies that inference imports."""
    out = []
    for dep in dependencies:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*([^;#]*)", dep)
        if m and m[1].lower() in INFER_MODULES:
            out.append((m[1].lower(), INFER_MODULES[m[1].lower()], m[2].strip()))
    return out


def _cell(kind: str, source: str) -> dict[str, Any]:
    lines = source.strip("\n").splitlines(keepends=True)
    cell: dict[str, Any] = {"cell_type": kind, "metadata": {}, "source": lines}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def render(spec: NotebookSpec) -> dict[str, Any]:
    """The notebook (nbformat 4) as a dict."""
    consts = (
        f"PACKAGE = {spec.package!r}\nCOMPETITION = {spec.competition!r}\n"
        f"SAMPLE = {spec.sample_submission!r}\nID_COL = {spec.id_col!r}\nREQUIRES = {spec.requires!r}\n"
    )
    cells = [
        _cell(
            "markdown",
            f"# {spec.package}: kpipe inference for `{spec.competition}`\n\n"
            "Rendered by `kpipe kernel`; runs with the internet off. It installs the kpipe wheel from the "
            "package dataset, checks the installed libraries, runs `kpipe infer` on the competition's "
            "test images and checks `submission.csv` against `sample_submission.csv`.",
        ),
        _cell("code", _SETUP.replace("# CONSTANTS\n", consts)),
        _cell("code", _INSTALL),
        _cell("code", _VERSIONS),
        _cell("code", _INFER),
        _cell("code", _CHECK),
    ]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def as_script(nb: dict[str, Any]) -> str:
    """The notebook's code cells in order, as one Python script (what the dry-run executes)."""
    parts = [
        f"# %% cell {i}\n" + "".join(c["source"])
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code"
    ]
    return "\n\n".join(parts) + "\n"


def dumps(nb: dict[str, Any]) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


_SETUP = '''
import json
import os
import subprocess
import sys
import time
from pathlib import Path

T0 = time.time()
# CONSTANTS
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # no version check over the (absent) network
ROOT = Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))  # the dry-run points this at a simulated tree
INPUT, WORK = ROOT / "input", ROOT / "working"


def find_package() -> Path:
    """The dataset folder whose kpipe_package.json names this package (Kaggle's mount point has moved before)."""
    for pattern in ("*/kpipe_package.json", "*/*/kpipe_package.json", "*/*/*/kpipe_package.json"):
        for spec in sorted(INPUT.glob(pattern)):
            if json.loads(spec.read_text(encoding="utf-8")).get("name") == PACKAGE:
                return spec.parent
    raise SystemExit(f"kpipe package {PACKAGE!r} not found under {INPUT}: add the dataset made by "
                     f"`kpipe package --upload` to the notebook's inputs. Inputs found: {sorted(os.listdir(INPUT))}")


def find_competition() -> Path:
    for where in (INPUT / COMPETITION, INPUT / "competitions" / COMPETITION):
        if (where / SAMPLE).is_file():
            return where
    raise SystemExit(f"competition {COMPETITION!r} not found under {INPUT} (no {SAMPLE}): add the competition to "
                     f"the notebook's inputs. Inputs found: {sorted(os.listdir(INPUT))}")


PKG, COMP = find_package(), find_competition()
WORK.mkdir(parents=True, exist_ok=True)
print(f"package {PKG}\\ncompetition {COMP}\\nworking {WORK}")
'''

_INSTALL = """
# The kpipe wheel, offline: no index, no dependencies (they come from the image; checked next).
wheels = sorted((PKG / "wheels").glob("kpipe-*.whl"))
if not wheels:
    raise SystemExit(f"{PKG}/wheels: no kpipe wheel. Write the package again with `kpipe package`.")
TARGET = os.environ.get("KPIPE_PIP_TARGET")  # the dry-run installs into a folder, not the local environment
ENV = dict(os.environ)
cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--disable-pip-version-check"]
if TARGET:  # what site-packages is on Kaggle: first on the path, here and in the kpipe subprocess
    cmd += ["--target", TARGET]
    ENV["PYTHONPATH"] = TARGET
    sys.path.insert(0, TARGET)
deps = sorted((PKG / "wheels" / "deps").glob("*.whl"))  # `kpipe package --bundle-deps`: before the check below
if deps:
    print("installing bundled wheels: " + ", ".join(w.name for w in deps))
subprocess.run(cmd + [str(w) for w in deps] + [str(wheels[-1])], check=True)
found = subprocess.run([sys.executable, "-c", "import kpipe; print(kpipe.__version__, kpipe.__file__)"],
                       env=ENV, capture_output=True, text=True, check=True).stdout.split()
print(f"kpipe {found[0]} from {found[1]}")
"""

_VERSIONS = """
from importlib import import_module, metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

print(f"python {sys.version.split()[0]}")
problems = []
for dist, module, spec in REQUIRES:
    try:
        mod = import_module(module)
        version = str(getattr(mod, "__version__", "") or metadata.version(dist))
    except (ImportError, metadata.PackageNotFoundError):
        problems.append(f"{dist}: missing (kpipe needs {dist}{spec})")
        print(f"{dist:24} MISSING      needs {spec}")
        continue
    ok = SpecifierSet(spec).contains(Version(version).public, prereleases=True)
    print(f"{dist:24} {version:12} needs {spec or 'any'}{'' if ok else '   <- NOT OK'}")
    if not ok:
        problems.append(f"{dist} {version} is outside kpipe's range {spec}")
import torch  # noqa: E402

print(f"cuda: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
if problems:
    raise SystemExit("this notebook's image lacks what kpipe needs:\\n  " + "\\n  ".join(problems) +
                     "\\nAdd wheels of those versions to a dataset and pip install them with --no-index "
                     "before this cell, or pick another environment (Settings > Environment).")
"""

_INFER = """
# The same code path as a local `kpipe infer`, reading the packaged weights.
cmd = [sys.executable, "-m", "kpipe", "infer", "-c", str(PKG / "config.yaml"), f"infer.package={PKG}",
       "infer.runs=null", "infer.ensemble_weights=null", "infer.name=submission", f"competition.data_dir={COMP}",
       f"paths.submissions_dir={WORK}", f"paths.predictions_dir={WORK / 'predictions'}",
       f"paths.data_root={WORK / 'data'}", f"paths.folds_dir={WORK / 'folds'}", f"paths.runs_dir={WORK / 'runs'}",
       f"data.cache_dir={WORK / 'cache'}", "train.device=auto"]
print(" ".join(cmd), flush=True)
t_infer = time.time()
done = subprocess.run(cmd, env=ENV, check=False)
if done.returncode != 0:
    raise SystemExit(f"kpipe infer failed (exit {done.returncode}); its message is above.")
print(f"kpipe infer: {time.time() - t_infer:.1f} s")
"""

_CHECK = """
import pandas as pd  # noqa: E402

sub_path = WORK / "submission.csv"
if not sub_path.is_file():
    raise SystemExit(f"{sub_path} was not written: Kaggle would answer 'Submission CSV Not Found'.")
sub = pd.read_csv(sub_path, dtype=str, keep_default_na=False)
sample = pd.read_csv(COMP / SAMPLE, dtype=str, keep_default_na=False)
id_col = ID_COL or sample.columns[0]
problems = []
if list(sub.columns) != list(sample.columns):
    problems.append(f"columns {list(sub.columns)} are not sample_submission's {list(sample.columns)}")
if len(sub) != len(sample):
    problems.append(f"{len(sub)} rows, sample_submission has {len(sample)}")
elif id_col in sub.columns and not sub[id_col].equals(sample[id_col]):
    problems.append(f"the {id_col} column is not sample_submission's, in its order")
if (sub == "").to_numpy().any():
    problems.append("empty cells")
if problems:
    raise SystemExit("submission.csv would fail scoring: " + "; ".join(problems))
print(f"submission.csv: {len(sub)} rows x {sub.shape[1]} columns, matches sample_submission; "
      f"{time.time() - T0:.1f} s in all")
print(sub.head())
"""
