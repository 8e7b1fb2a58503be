"""Code competitions: kpipe package -> kpipe kernel -> dry-run, on hand-built runs (no training).

The dry-run executes the rendered notebook in a subprocess that installs the packaged wheel, so the
module builds one package and shares it (a few seconds of pip).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config, write_competition
from kpipe import paths
from kpipe.config import Config
from kpipe.errors import KpipeError
from kpipe.io import read_csv_ids
from kpipe.kaggle import notebook
from kpipe.kaggle import package as pkg
from kpipe.stages import folds, infer, kernel, package
from test_infer import make_run

DIRS = ["paths.packages_dir", "paths.kernels_dir"]


def setup(root: Path, overrides: list[str] = ()) -> Config:
    comp = write_competition(root)
    cfg = tiny_config(root, comp, ["name=a", f"paths.packages_dir={root / 'package'}",
                                   f"paths.kernels_dir={root / 'kernels'}", "package.owner=tester", *overrides])
    folds.run(cfg)
    make_run(cfg)
    return cfg


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> Config:
    cfg = setup(tmp_path_factory.mktemp("codecomp"))
    package.run(cfg)
    return cfg


def test_package_holds_what_infer_needs(packaged: Config) -> None:
    where = paths.package_dir(packaged)
    man = json.loads(where.manifest.read_text())
    names = {f["path"] for f in man["files"]}
    assert {"kpipe_package.json", "config.yaml", "classes.json", "dataset-metadata.json",
            "runs/a/config.yaml", "runs/a/fold0.safetensors", "runs/a/fold0.json", "runs/a/fold1.safetensors"} <= names
    assert any(n.startswith("wheels/kpipe-") and n.endswith(".whl") for n in names)
    assert not any(n.endswith(".pt") for n in names)  # no pickle travels
    for f in man["files"]:
        assert pkg.sha256_file(where.root / f["path"]) == f["sha256"]
        assert (where.root / f["path"]).stat().st_size == f["bytes"]
    meta = json.loads(where.metadata.read_text())
    assert meta["id"] == "tester/a-package" and meta["licenses"] == [{"name": "CC0-1.0"}]
    spec = pkg.read_spec(where.root)
    assert spec.runs[0].folds == [0, 1] and spec.runs[0].views == ["identity", "hflip"]


def test_infer_from_package_equals_infer_from_runs(packaged: Config) -> None:
    a = infer.run(packaged)
    pcfg = packaged.model_copy(update={"infer": packaged.infer.model_copy(
        update={"package": str(paths.package_dir(packaged).root), "name": "frompkg"})})
    b = infer.run(pcfg)
    pa = read_csv_ids(Path(a["predictions"]) / "probs.csv").drop(columns="id").astype(float).to_numpy()
    pb = read_csv_ids(Path(b["predictions"]) / "probs.csv").drop(columns="id").astype(float).to_numpy()
    np.testing.assert_array_equal(pa, pb)
    assert read_csv_ids(a["submission"]).equals(read_csv_ids(b["submission"]))


def test_package_refused_over_size_with_breakdown(tmp_path: Path) -> None:
    cfg = setup(tmp_path, ["package.max_mb=0.01"])
    with pytest.raises(KpipeError, match=r"over package.max_mb=0.01 MB:\n  runs/a: .* MB") as e:
        package.run(cfg)
    assert "wheels" in str(e.value)
    assert not paths.package_dir(cfg).root.exists()


def test_kernel_metadata_and_notebook(packaged: Config) -> None:
    kd = kernel.run(packaged)
    meta = json.loads(kd.metadata.read_text())
    assert meta["enable_internet"] is False and meta["dataset_sources"] == ["tester/a-package"]
    assert meta["competition_sources"] == ["tiny"] and meta["code_file"] == "a-infer.ipynb"
    nb = json.loads(kd.notebook.read_text())
    assert nb["nbformat"] == 4
    script = notebook.as_script(nb)
    compile(script, "notebook", "exec")
    assert "--no-index" in script and '"infer"' in script


def test_dry_run_equals_infer_and_resizes(packaged: Config) -> None:
    infer.run(packaged)
    kernel.run(packaged)
    report = kernel.dry_run(packaged, rows=10, hidden_rows=1000)
    kd = paths.kernel_dir(packaged)
    local = paths.submission_csv(packaged, "a")
    assert (kd.dry_run / "public" / "submission.csv").read_bytes() == local.read_bytes()
    assert report["same_as_infer"] is True
    np.testing.assert_array_equal(
        read_csv_ids(kd.dry_run / "public" / "probs.csv").drop(columns="id").astype(float).to_numpy(),
        read_csv_ids(Path(packaged.paths.predictions_dir) / "a" / "probs.csv").drop(columns="id").astype(float).to_numpy())
    big = read_csv_ids(kd.dry_run / "rows10" / "submission.csv")
    assert len(big) == 10 and big["id"].iloc[7] == "r000007_t001"
    assert [c["rows"] for c in report["cases"]] == [6, 10]
    assert report["fits"] and report["projected_s"] > 0
    log = (kd.dry_run / "public" / "log.txt").read_text()
    assert "kpipe 0.1.0 from" in log and "matches sample_submission" in log
