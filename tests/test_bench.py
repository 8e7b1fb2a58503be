"""`kpipe bench`: correctness of what it measures (never its speed).

The cache's content against a fresh decode is tests/test_cache.py's; here: the synthetic photos,
the image set's reuse, the batch-augmentation step's shapes and
ranges, the tutorial pipeline, the code of the GPU section (run on CPU), the target check, and one
--quick run end to end.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from kpipe.errors import KpipeError
from kpipe.tools import bench
from kpipe.tools.bench import report

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _plan(n: int = 32) -> bench.Plan:
    return replace(bench.make_plan(64, 1, True), n_images=n, photo_hw=(48, 64), img_size=24, batch=8)


def test_photo_is_deterministic_and_codes_like_a_photo() -> None:
    a = bench.photo(np.random.default_rng([0, 1]), 120, 160)
    assert a.shape == (120, 160, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, bench.photo(np.random.default_rng([0, 1]), 120, 160))
    ok, buf = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 90])
    # Texture and grain: far more bytes per pixel than a flat drawing (~0.05), like a q90 photo.
    assert ok and len(buf) / (120 * 160) > 0.25
    assert a.std() > 20


def test_image_set_is_written_once_in_class_folders(tmp_path: Path) -> None:
    plan = _plan()
    root, paths, labels = bench.image_set(tmp_path, plan)
    assert len(paths) == plan.n_images and all(Path(p).is_file() for p in paths)
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == [f"c{i}" for i in range(bench.N_CLASSES)]
    assert [Path(p).parent.name for p in paths] == [f"c{y}" for y in labels]
    before = {p: Path(p).stat().st_mtime_ns for p in paths}
    assert bench.image_set(tmp_path, plan)[1] == paths
    assert {p: Path(p).stat().st_mtime_ns for p in paths} == before  # reused, not rewritten
    assert not list(tmp_path.glob("*.partial"))


def test_consumer_batch_aug_shapes_and_range() -> None:
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)  # NCHW, as loader.CachedBatches yields
    x[0] = 0
    x[1] = 255
    out = bench.consumer_batch_aug(24, MEAN, STD)(x)
    assert out.shape == (6, 3, 24, 24) and out.dtype == torch.float32
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    lo, hi = -m / s, (1 - m) / s
    assert bool((out >= lo - 1e-5).all() and (out <= hi + 1e-5).all())
    torch.testing.assert_close(out[0], lo.expand(3, 24, 24))  # a black image stays black
    torch.testing.assert_close(out[1], hi.expand(3, 24, 24))


def test_tutorial_transform_gives_normalised_tensors(tmp_path: Path) -> None:
    from PIL import Image

    _, paths, _ = bench.image_set(tmp_path, _plan())
    tf = bench.tutorial_transform(24, MEAN, STD)
    batch = default_collate([tf(Image.open(p).convert("RGB")) for p in paths[:4]])
    assert batch.shape == (4, 3, 24, 24) and batch.dtype == torch.float32
    assert -3 < float(batch.min()) < 0 < float(batch.max()) < 3


def _gpu_plan() -> bench.Plan:
    """The GPU section's sizes shrunk to run on CPU: tiny model, 32 px, batch 8, in-process loaders."""
    return replace(
        _plan(),
        gpu_model="test_resnet",
        gpu_size=32,
        gpu_batch=8,
        gpu_steps=2,
        gpu_compile=False,
        gpu_e2e_steps=2,
        gpu_workers=0,
    )


def test_gpu_section_code_runs_on_cpu(tmp_path: Path) -> None:
    out = bench.gpu_section(_gpu_plan(), torch.device("cpu"), tmp_path)
    assert {"kpipe", "bare", "kpipe_fp32"} <= out["training"].keys()
    assert set(out["training"]["ratios"]) == {"amp_bf16_channels_last_vs_fp32", "kpipe_vs_bare"}
    assert {"fp32", "fp32_hflip"} <= out["inference"].keys()
    assert all(v["median"] > 0 for k, v in out["training"].items() if k != "ratios")
    e2e = out["e2e"]
    cases = {"timm_train", "kpipe_train_uncached", "kpipe_train_cached", "kpipe_train_cached_batch_aug"}
    assert cases <= e2e.keys() and all(e2e[c]["median"] > 0 for c in cases)
    assert e2e["ratios"]["kpipe_uncached_vs_timm"] == e2e["ratios"]["kpipe_train_uncached"] > 0
    dec = out["decode"]
    rows = {
        "infer_loader_cpu_decode",
        "infer_loader_gpu_decode",
        "kpipe_infer_cpu_decode",
        "kpipe_infer_gpu_decode",
    }
    assert rows <= dec.keys() and all(dec[r]["median"] > 0 for r in rows)
    assert set(dec["ratios"]) == {"loader_gpu_vs_cpu_decode", "infer_gpu_vs_cpu_decode"}
    machine = {k: "x" for k in ("cpu", "cores", "torch_threads", "cuda", "python", "torch", "torchvision")}
    machine.update({k: "x" for k in ("timm", "albumentations", "cv2", "numpy", "pillow")}, cpu_bf16=False)
    res = {
        "command": "kpipe bench",
        "date": "today",
        "seconds": 1.0,
        "machine": machine,
        "load_average": {"start": 0.0, "end": 0.0},
        "plan": asdict(_gpu_plan()),
        "data": {},
        "inference": {},
        "training": {},
        "gpu": out,
        "targets": [],
    }
    md = report.render_md(res)
    assert "GPU end to end" in md and report.LABELS["timm_train"] in md and "kpipe_uncached_vs_timm" in md
    assert "GPU decode" in md and report.LABELS["kpipe_infer_gpu_decode"] in md


def test_timm_case_is_built_from_timm_library_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.data
    import timm.optim
    import timm.scheduler

    calls: dict[str, dict] = {}

    def spy(module: object, name: str) -> None:
        real = getattr(module, name)

        def wrapped(*args: object, **kwargs: object) -> object:
            calls[name] = kwargs
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    for module, name in (
        (timm.data, "create_dataset"),
        (timm.data, "resolve_data_config"),
        (timm.data, "create_loader"),
        (timm.optim, "create_optimizer_v2"),
        (timm.scheduler, "create_scheduler_v2"),
    ):
        spy(module, name)
    root, paths, labels = bench.image_set(tmp_path, _plan())
    case = bench.timm_train_case(root, "test_resnet", 32, 8, 2, 0, torch.device("cpu"))
    assert set(calls) == {
        "create_dataset",
        "resolve_data_config",
        "create_loader",
        "create_optimizer_v2",
        "create_scheduler_v2",
    }
    assert calls["create_loader"]["is_training"] and calls["create_loader"]["use_prefetcher"]
    assert calls["create_loader"]["input_size"] == (3, 32, 32)
    assert calls["create_dataset"]["root"] == str(root) and calls["create_dataset"]["is_training"]
    assert calls["create_optimizer_v2"]["opt"] == "adamw"  # kpipe's default optimiser on both sides
    assert calls["create_scheduler_v2"]["updates_per_epoch"] == len(paths) // 8
    assert case() > 0


def test_kpipe_e2e_cases_train_from_files_and_cache(tmp_path: Path) -> None:
    from kpipe.data import cache

    _, paths, labels = bench.image_set(tmp_path, _plan())
    arr = cache.build_cache(paths, 32, tmp_path / "c.npy")
    cases = bench.kpipe_train_cases(paths, labels, arr, "test_resnet", (32, 8, 2, 0), torch.device("cpu"))
    assert set(cases) == {"kpipe_train_uncached", "kpipe_train_cached", "kpipe_train_cached_batch_aug"}
    assert all(c() > 0 for c in cases.values())


def test_make_plan_and_targets() -> None:
    with pytest.raises(KpipeError, match="--repeats"):
        bench.make_plan(1000, 0, False)
    with pytest.raises(KpipeError, match="--images"):
        bench.make_plan(10, 3, False)
    res = {
        "data": {"ratios": {"kpipe_files": 2.0, "kpipe_cache": 2.0, "kpipe_cache_batch_aug": 5.0}},
        "inference": {"ratios": {"hflip_cost": 2.1, "kpipe_infer_auto": 3.2, "kpipe_infer_best": 2.9}},
        "training": {"ratios": {"kpipe": 0.99}},
    }
    met = {t["key"]: t["met"] for t in bench.check_targets(res)}
    assert met == {
        "data.ratios.kpipe_files": True,
        "data.ratios.kpipe_cache": False,
        "data.ratios.kpipe_cache_batch_aug": True,
        "inference.ratios.hflip_cost": False,
        "inference.ratios.kpipe_infer_auto": True,
        "inference.ratios.kpipe_infer_best": False,
        "training.ratios.kpipe": True,
    }
    assert not any(t["key"].startswith("gpu.") for t in bench.check_targets({**res, "gpu": {"skipped": "x"}}))
    ran = {**res, "gpu": {"e2e": {"ratios": {"kpipe_uncached_vs_timm": 1.02}}}}
    gpu = [t for t in bench.check_targets(ran) if t["key"].startswith("gpu.")]
    assert [(t["key"], t["met"]) for t in gpu] == [("gpu.e2e.ratios.kpipe_uncached_vs_timm", True)]
    assert gpu[0]["target"] == bench.GPU_TARGETS[gpu[0]["key"]][2]


def test_quick_bench_end_to_end(tmp_path: Path) -> None:
    res = bench.run(tmp_path, n_images=64, repeats=1, quick=True)
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert {
        "command",
        "machine",
        "plan",
        "data",
        "inference",
        "training",
        "gpu",
        "targets",
        "seconds",
    } <= saved.keys()
    assert {"cpu", "cores", "torch", "timm", "albumentations", "cv2"} <= saved["machine"].keys()
    cases = {
        "tutorial",
        "kpipe_files",
        "kpipe_cache",
        "kpipe_cache_batch_aug",
        "ceiling_decode",
        "ceiling_cache_to_float",
    }
    assert cases <= saved["data"].keys() and set(saved["data"]["ratios"]) == cases - {"tutorial"}
    assert all(saved["data"][c]["median"] > 0 and len(saved["data"][c]["runs"]) == 1 for c in cases)
    assert {"kpipe_infer", "kpipe_infer_hflip", "fp32", "fp32_hflip"} <= saved[
        "inference"
    ].keys() and "hflip_cost" in saved["inference"]["ratios"]
    assert "kpipe_infer_auto" in saved["inference"]["ratios"]
    auto = saved["inference"]["auto_precision"]
    assert auto["form"].endswith("+ channels_last") and 0 <= auto["argmax_agreement"] <= 1
    inf = saved["inference"]
    best = inf["best_form"]
    assert best["case"] in inf["forms"] and 0 <= best["argmax_agreement"] <= 1
    assert inf["ratios"]["kpipe_infer_best"] == max(inf["ratios"][c] for c in inf["forms"])
    assert "kpipe_infer_compiled" not in inf  # --quick leaves torch.compile out (tens of seconds)
    if "openvino_skipped" not in inf:
        hint = "bf16" if saved["machine"]["cpu_bf16"] else "f32"
        assert {"kpipe_infer_openvino", f"openvino_{hint}"} <= inf.keys()
        assert inf["forms"]["kpipe_infer_openvino"]["form"] == f"OpenVINO, {hint} hint"
    assert "kpipe" in saved["training"]["ratios"]
    assert len(saved["targets"]) == len(bench.TARGETS) and all(
        isinstance(t["met"], bool) for t in saved["targets"]
    )
    if not torch.cuda.is_available():
        assert "skipped" in saved["gpu"]
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "kpipe bench --out" in md and "## Targets" in md and "infer.precision=auto's form here" in md
    assert "fastest CPU form here" in md
    assert res["targets"] == saved["targets"]


def test_scale_growth_and_targets() -> None:
    def sizes(t: float, rss: float) -> dict:
        return {s: {"seconds": t, "peak_rss_mb": rss} for s in ("audit", "folds", "cache", "infer")}

    g = bench.growth(sizes(1.0, 300.0), sizes(4.2, 400.0), 1000, 4)
    assert g["time_ratio"]["audit"] == 4.2
    assert g["audit_rss_mb_at_50k"] == pytest.approx(400 + 100 / 3000 * 46_000, abs=0.1)
    res = {"factor": 4, "growth": {**g, "time_ratio": {**g["time_ratio"], "infer": 4.6}}}
    met = [t["met"] for t in bench.check_scale(res)]
    assert met == [True, True, True, False, True]


@pytest.mark.slow
def test_scale_runs_every_stage_as_a_subprocess(tmp_path: Path) -> None:
    res = bench.run_scale(tmp_path, 100, 2, 32, "test_resnet")
    assert set(res["sizes"]) == {"100", "200"}
    for n, stages in res["sizes"].items():
        assert stages["folds"]["images"] == int(n) and stages["infer"]["images"] == int(n) // 4
        assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 50 for s in stages.values())
    assert (tmp_path / "scale_results.md").is_file() and len(res["targets"]) == 5
    assert (tmp_path / "scale_200" / "work" / "submissions_dir" / "scale.csv").is_file()
