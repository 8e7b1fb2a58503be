"""Code competitions: kpipe package -> kpipe kernel -> dry-run, on hand-built runs (no training).

The dry-run executes the rendered notebook in a subprocess that installs the packaged wheel, so the
module builds one package and shares it (a few seconds of pip).
"""

from __future__ import annotations

import json
import shutil
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
    # infer.precision=auto checks its proposal on validation images in both: the local run on the fold table's,
    # the notebook on the package's check/ copies of them. Here both keep the same form (bf16 on a CPU with
    # native bf16, else fp32), so the probabilities are the same to the bit.
    local = infer.run(packaged)
    (form,) = json.loads(paths.sidecar(Path(local["submission"])).read_text())["precision"].values()
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
    assert f"precision {form['precision']}" in " ".join(log.split())
    if form["check"]:  # the notebook's check ran on the package's images, as many as the local one's
        assert f"on {form['check']['images']} validation images" in " ".join(log.split())


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


def _from_package(cfg: Config, root: Path, name: str) -> Config:
    return cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"package": str(root), "name": name})})


def test_package_brings_check_images_and_the_notebook_checks_with_them(
    packaged: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check/ holds validation images of each packaged fold at the run's size; `kpipe infer` from the package
    (the notebook's path) checks infer.precision=auto on them, each fold model on its own fold's, and falls back
    to fp32 when bf16 disagrees; without check/ it says why it runs fp32."""
    import cv2

    from kpipe.nn import precision, predict
    from test_precision_disk import NoisyInBF16

    root = tmp_path / "pkg"
    shutil.copytree(paths.package_dir(packaged).root, root)
    table = pkg.read_check(root)
    fold_table = read_csv_ids(paths.folds_csv(packaged))
    assert sorted(table["fold"].unique()) == [0, 1] and len(table) == len(fold_table)  # 12 rows < 256
    assert {cv2.imread(p).shape for p in table["path"]} == {(32, 32, 3)}
    monkeypatch.setattr(precision, "cpu_bf16", lambda: True)  # propose bf16 on any CPU
    seen: list[dict] = []
    real = predict.sample_predictor

    def spy(rm, files_by_fold, *args, **kw):  # noqa: ANN001, ANN202
        seen.append(files_by_fold)
        return real(rm, files_by_fold, *args, **kw)

    monkeypatch.setattr(predict, "sample_predictor", spy)
    out = infer.run(_from_package(packaged, root, "p1"))
    (form,) = json.loads(paths.sidecar(Path(out["submission"])).read_text())["precision"].values()
    assert form["precision"] == "bf16" and form["check"]["images"] == len(table)
    assert {k: set(v) for k, v in seen[0].items()} == {k: set(g["path"]) for k, g in table.groupby("fold")}
    load = predict.load_run
    monkeypatch.setattr(
        predict,
        "load_run",
        lambda *a, **kw: (
            lambda rm: predict.RunModels(
                rm.run, rm.cfg, rm.folds, [NoisyInBF16(m).eval() for m in rm.models], rm.data_cfg
            )
        )(load(*a, **kw)),
    )
    out = infer.run(_from_package(packaged, root, "p2"))
    (form,) = json.loads(paths.sidecar(Path(out["submission"])).read_text())["precision"].values()
    assert form["precision"] == "fp32" and form["reason"].startswith("fp32: bf16 disagrees with fp32")
    shutil.rmtree(root / "check")
    out = infer.run(_from_package(packaged, root, "p3"))
    (form,) = json.loads(paths.sidecar(Path(out["submission"])).read_text())["precision"].values()
    assert form["precision"] == "fp32" and form["check"] is None


@pytest.mark.parametrize(
    "rows",
    [
        "file,fold\n../fold0_00000.jpg,0\n",  # outside check/
        "file,fold\n/etc/hostname,0\n",  # absolute
        "file,fold\nlink.jpg,0\n",  # a symbolic link
        "file,fold\nfold0_00000.jpg,zero\n",  # no fold number
        "file,fold\nfold0_00000.jpg,-2\n",  # -1 is the full-data model's
        "file,fold\nmissing.jpg,0\n",
        "name,fold\nfold0_00000.jpg,0\n",  # wrong columns
        "file,fold\n" + "fold0_00000.jpg,0\n" * 10_001,  # too many rows
    ],
)
def test_a_hostile_check_csv_is_refused(packaged: Config, tmp_path: Path, rows: str) -> None:
    root = tmp_path / "pkg"
    shutil.copytree(paths.package_dir(packaged).root, root)
    (root / "check" / "link.jpg").symlink_to(root / "check" / "fold0_00000.jpg")
    (root / "check" / "check.csv").write_text(rows)
    with pytest.raises(KpipeError, match="check.csv"):
        pkg.read_check(root)


def test_a_full_data_model_is_packaged_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kpipe train --full`'s full/best.pt travels as runs/<run>/full.safetensors (it was left out), the package
    predicts exactly as the run does, and the precision check covers the full model too, on any train images
    (it has no validation fold; before, it went unchecked, and a full-only run always ran fp32)."""
    from kpipe.nn import precision

    monkeypatch.setattr(precision, "cpu_bf16", lambda: True)  # propose bf16 on any CPU
    cfg = setup(tmp_path)
    run = paths.run_dir(cfg).root
    (run / "full").mkdir()
    shutil.copy(run / "fold0" / "best.pt", run / "full" / "best.pt")
    package.run(cfg)
    root = paths.package_dir(cfg).root
    assert (root / "runs" / "a" / "full.safetensors").is_file() and (
        root / "runs" / "a" / "full.json"
    ).is_file()
    assert pkg.read_spec(root).runs[0].folds == [0, 1, -1]
    table = pkg.read_check(root)
    assert sorted(table["fold"].unique()) == [-1, 0, 1]
    a = infer.run(cfg)
    b = infer.run(_from_package(cfg, root, "p"))
    for out in (a, b):
        (form,) = json.loads(paths.sidecar(Path(out["submission"])).read_text())["precision"].values()
        assert form["check"]["images"] == 6 + 6 + 12  # each fold's 6 rows, and every row for the full model
    np.testing.assert_array_equal(
        read_csv_ids(Path(a["predictions"]) / "probs.csv").drop(columns="id").astype(float).to_numpy(),
        read_csv_ids(Path(b["predictions"]) / "probs.csv").drop(columns="id").astype(float).to_numpy(),
    )
    for k in (0, 1):
        shutil.rmtree(run / f"fold{k}")
    (form,) = json.loads(paths.sidecar(Path(infer.run(cfg)["submission"])).read_text())["precision"].values()
    assert form["check"]["images"] == 12  # a full-only run is checked on train images, not left in fp32


def test_an_oversized_check_csv_is_not_read(packaged: Config, tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    shutil.copytree(paths.package_dir(packaged).root, root)
    (root / "check" / "check.csv").write_text("file,fold\n" + "fold0_00000.jpg,0\n" * 200_000)
    with pytest.raises(KpipeError, match="bytes, over the 2,097,152 .* not read"):
        pkg.read_check(root)


def test_package_check_images_zero_writes_none(tmp_path: Path) -> None:
    cfg = setup(tmp_path, ["package.check_images=0"])
    package.run(cfg)
    assert not (paths.package_dir(cfg).root / "check").exists()


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
