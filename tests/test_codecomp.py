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
    cfg = tiny_config(
        root,
        comp,
        [
            "name=a",
            f"paths.packages_dir={root / 'package'}",
            f"paths.kernels_dir={root / 'kernels'}",
            "package.owner=tester",
            *overrides,
        ],
    )
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
    assert {
        "kpipe_package.json",
        "config.yaml",
        "classes.json",
        "dataset-metadata.json",
        "runs/a/config.yaml",
        "runs/a/fold0.safetensors",
        "runs/a/fold0.json",
        "runs/a/fold1.safetensors",
    } <= names
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
    pcfg = packaged.model_copy(
        update={
            "infer": packaged.infer.model_copy(
                update={"package": str(paths.package_dir(packaged).root), "name": "frompkg"}
            )
        }
    )
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


@pytest.mark.slow
def test_dry_run_equals_infer_and_resizes(packaged: Config) -> None:
    # The notebook has no validation images to check a faster form or runtime against, so infer.precision=auto
    # runs fp32 and infer.runtime=auto would run torch there: the local run it is compared with does the same.
    local_infer = packaged.infer.model_copy(update={"precision": "fp32", "runtime": "torch"})
    infer.run(packaged.model_copy(update={"infer": local_infer}))
    kernel.run(packaged)
    report = kernel.dry_run(packaged, rows=10, hidden_rows=1000)
    kd = paths.kernel_dir(packaged)
    local = paths.submission_csv(packaged, "a")
    assert (kd.dry_run / "public" / "submission.csv").read_bytes() == local.read_bytes()
    assert report["same_as_infer"] is True
    np.testing.assert_array_equal(
        read_csv_ids(kd.dry_run / "public" / "probs.csv").drop(columns="id").astype(float).to_numpy(),
        read_csv_ids(Path(packaged.paths.predictions_dir) / "a" / "probs.csv")
        .drop(columns="id")
        .astype(float)
        .to_numpy(),
    )
    big = read_csv_ids(kd.dry_run / "rows10" / "submission.csv")
    assert len(big) == 10 and big["id"].iloc[7] == "r000007_t001"
    assert [c["rows"] for c in report["cases"]] == [6, 10]
    assert report["fits"] and report["projected_s"] > 0
    log = (kd.dry_run / "public" / "log.txt").read_text()
    assert "kpipe 0.1.0 from" in log and "matches sample_submission" in log


def test_projection_is_a_line_through_the_two_runs() -> None:
    overhead, per, total = kernel.project([{"rows": 10, "wall_s": 12.0}, {"rows": 30, "wall_s": 16.0}], 1000)
    assert (overhead, per, total) == pytest.approx((10.0, 0.2, 210.0))


def test_repeat_test_keeps_the_id_to_file_rule(tmp_path: Path) -> None:
    import pandas as pd

    test = pd.DataFrame(
        {
            "id": ["a", "b.png"],
            "path": [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")],
            "found": [True, True],
        }
    )
    sample = pd.DataFrame({"id": ["a", "b.png"], "label": ["x", "x"]})
    out, files = kernel.repeat_test(test, sample, "id", 5)
    assert out["id"].tolist() == ["r000000_a", "r000001_b.png", "r000002_a", "r000003_b.png", "r000004_a"]
    assert [name for _, name in files][:2] == ["r000000_a.jpg", "r000001_b.png"]


def test_package_of_an_ensemble_blends_like_infer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        pkg,
        "build_wheel",
        lambda out: (out.mkdir(parents=True), (out / "kpipe-0-py3-none-any.whl").write_bytes(b"wheel"))[1],
    )
    cfg = setup(tmp_path)
    other = cfg.model_copy(update={"name": "b"})
    make_run(other, seed=1)
    runs = [str(paths.run_dir(cfg).root), str(paths.run_dir(other).root)]
    weights = tmp_path / "ens.json"
    weights.write_text(
        json.dumps(
            {
                "classes": ["cat", "dog", "fox"],
                "how": "mean",
                "cv_blend": 0.77,
                "members": [
                    {"run": runs[0], "view": "identity", "weight": 0.7},
                    {"run": runs[1], "view": "hflip", "weight": 0.3},
                    {"run": runs[1], "view": "identity", "weight": 0.0},
                ],
            }
        )
    )
    ens = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"ensemble_weights": str(weights)})})
    package.run(ens)
    spec = pkg.read_spec(paths.package_dir(ens).root)
    assert [(r.tag, r.views) for r in spec.runs] == [
        ("a", ["identity"]),
        ("b", ["hflip"]),
    ] and spec.cv == 0.77
    a = infer.run(ens)
    frompkg = ens.model_copy(
        update={
            "infer": ens.infer.model_copy(
                update={"ensemble_weights": None, "package": str(paths.package_dir(ens).root), "name": "p"}
            )
        }
    )
    b = infer.run(frompkg)
    np.testing.assert_allclose(
        read_csv_ids(Path(a["predictions"]) / "probs.csv").drop(columns="id").astype(float).to_numpy(),
        read_csv_ids(Path(b["predictions"]) / "probs.csv").drop(columns="id").astype(float).to_numpy(),
        rtol=0,
        atol=0,
    )
    assert b["cv"] == 0.77


def test_kernel_before_package_says_what_to_run(tmp_path: Path) -> None:
    cfg = setup(tmp_path)
    with pytest.raises(KpipeError, match="no package yet"):
        kernel.run(cfg)


def test_infer_package_refuses_runs_too(packaged: Config) -> None:
    pcfg = packaged.model_copy(
        update={"infer": packaged.infer.model_copy(update={"package": str(paths.package_dir(packaged).root)})}
    )
    with pytest.raises(KpipeError, match="brings its own runs"):
        infer.run(pcfg, runs=["runs/x"])


def test_versions_cell_names_what_is_missing_or_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    requires = [
        ("numpy", "numpy", ">=1.0"),
        ("numpy-from-the-future", "numpy", ">=999"),
        ("not-installed", "kpipe_no_such_module", ">=1"),
    ]
    with pytest.raises(SystemExit) as e:
        exec(notebook._VERSIONS, {"sys": sys, "REQUIRES": requires})  # noqa: S102 (our own cell, as the notebook runs it)
    assert "numpy-from-the-future" in str(e.value) and "outside kpipe's range >=999" in str(e.value)
    assert "not-installed: missing" in str(e.value)
    out = capsys.readouterr().out
    assert "<- NOT OK" in out and "MISSING" in out


def test_requirements_come_from_pyproject_and_skip_what_infer_does_not_import() -> None:
    got = dict(
        (d, (m, s))
        for d, m, s in notebook.requirements(
            ["torch>=2.4", "kaggle>=2.2,<2.3", "pyyaml>=6", "albumentations>=2.0,<2.1  # pinned"]
        )
    )
    assert got == {
        "torch": ("torch", ">=2.4"),
        "pyyaml": ("yaml", ">=6"),
        "albumentations": ("albumentations", ">=2.0,<2.1"),
    }


def test_bundle_deps_downloads_wheels_at_kpipes_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[list[str], str]] = []

    def fake_download(specs: list[str], out: Path, python: str, platforms: list[str]) -> list[Path]:
        asked.append((specs, python))
        out.mkdir(parents=True)
        (out / "albumentations-2.0.8-py3-none-any.whl").write_bytes(b"w")
        return sorted(out.glob("*.whl"))

    monkeypatch.setattr(
        pkg,
        "build_wheel",
        lambda out: (out.mkdir(parents=True), (out / "kpipe-0-py3-none-any.whl").write_bytes(b"wheel"))[1],
    )
    monkeypatch.setattr(pkg, "download_wheels", fake_download)
    cfg = setup(tmp_path, ["package.bundle_deps=albumentations,somethingelse"])
    man = package.run(cfg)
    assert asked == [(["albumentations>=2.0,<2.1", "somethingelse"], "3.11")]
    assert "wheels/deps/albumentations-2.0.8-py3-none-any.whl" in {f["path"] for f in man["files"]}
    kernel.run(cfg)
    assert 'PKG / "wheels" / "deps"' in notebook.as_script(
        json.loads(paths.kernel_dir(cfg).notebook.read_text())
    )


def test_package_without_an_owner_says_where_to_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    cfg = setup(tmp_path, ["package.owner=null"])
    with pytest.raises(KpipeError, match="set package.owner=<your Kaggle user name>"):
        package.run(cfg)
    assert not paths.package_dir(cfg).root.exists()


def test_dry_run_tree_and_failures(packaged: Config, tmp_path: Path) -> None:
    """The simulated /kaggle as the notebook sees it; a failing or overlong notebook is a clear error."""
    probe = (
        "import os, sys, urllib.request\nfrom pathlib import Path\nroot = Path(os.environ['KAGGLE_ROOT'])\n"
        "print(sorted(p.name for p in (root / 'input').iterdir()))\n"
        "print(sorted(p.name for p in (root / 'input' / 'tiny' / 'test').iterdir())[:2])\n"
        "print(oct((root / 'input' / 'tiny').stat().st_mode & 0o777), Path.cwd() == root / 'working')\n"
        "try:\n    urllib.request.urlopen('http://example.com', timeout=5)\n    print('NETWORK')\n"
        "except OSError as e:\n    print('offline')\n"
        "(root / 'working' / 'submission.csv').write_text('id,label\\n')\n"
        "(root / 'working' / 'predictions' / 'submission').mkdir(parents=True)\n"
        "(root / 'working' / 'predictions' / 'submission' / 'probs.csv').write_text('id\\n')\n"
    )
    case = kernel._run_case(packaged, probe, 4, tmp_path / "probe", 120)
    log = (tmp_path / "probe" / "log.txt").read_text().splitlines()
    assert log[0] == "['a-package', 'tiny']" and log[1] == "['r000000_t000.png', 'r000001_t001.png']"
    assert log[2] == "0o550 True" and log[3] == "offline" and case["rows"] == 4
    with pytest.raises(
        KpipeError, match=r"failed in the dry-run on 6 rows \(exit 1\)(.|\n)*package 'x' not found"
    ):
        kernel._run_case(
            packaged, "raise SystemExit(\"package 'x' not found\")", None, tmp_path / "fail", 120
        )
    with pytest.raises(KpipeError, match="Notebook Timeout"):
        kernel._run_case(packaged, "import time; time.sleep(30)", None, tmp_path / "slow", 1)


def test_kernel_and_dataset_slugs_follow_kaggles_rule(packaged: Config) -> None:
    cfg = packaged.model_copy(update={"name": "B0_384 v2"})
    meta = kernel.kernel_metadata(cfg, "tester/b0-384-v2-package")
    assert meta["id"] == "tester/b0-384-v2-infer" and meta["title"] == "b0-384-v2-infer"
    assert meta["code_file"] == "B0_384 v2-infer.ipynb"
    with pytest.raises(KpipeError, match="package.name 'ab' gives the Kaggle slug 'ab'"):
        pkg.kaggle_slug_of("ab", "package.name")
