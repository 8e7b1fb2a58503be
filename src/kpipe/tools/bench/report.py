"""The bench's report: the targets checked against the results, the table printed, results.md written.

What each row measures, and why each target is set where it is, is prose: it lives in docs/bench.md,
which results.md points to. Here are only the data the report needs: the targets (`TARGETS`), the rows'
labels (`LABELS`) and each section's base case (`BASES`).
Usage: ``res["targets"] = check_targets(res); write_text(out / "results.md", render_md(res)); print_table(res)``
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from kpipe.console import console

DOC = "docs/bench.md"  # what each row measures, how, and why its target is set there

# results key (dotted) -> (comparison, goal, the target's label in the report); docs/bench.md explains each.
TARGETS: dict[str, tuple[str, float, str]] = {
    "data.ratios.kpipe_files": (">=", 1.8, "kpipe loader (files) vs tutorial"),
    "data.ratios.kpipe_cache": (">=", 2.8, "kpipe loader (cache) vs tutorial"),
    "data.ratios.kpipe_cache_batch_aug": (">=", 4.5, "cache + batch augmentation vs tutorial"),
    "inference.ratios.hflip_cost": ("<=", 2.05, "kpipe infer: hflip TTA cost vs no TTA (ideal 2.0)"),
    "inference.ratios.kpipe_infer_auto": (
        ">=",
        3.0,
        "kpipe infer, infer.precision=auto's form vs the fp32 loop",
    ),
    "inference.ratios.kpipe_infer_best": (
        ">=",
        3.0,
        "kpipe infer CPU no-TTA best form (auto / compiled / OpenVINO) vs the fp32 loop",
    ),
    "training.ratios.kpipe": (">=", 0.95, "kpipe training step vs bare loop"),
}

# Checked only when the GPU section ran (a CUDA device was present).
GPU_TARGETS: dict[str, tuple[str, float, str]] = {
    "gpu.e2e.ratios.kpipe_uncached_vs_timm": (
        ">=",
        1.0,
        "kpipe end-to-end training >= 1.0x timm's pipeline (GPU)",
    ),
}


def _get(res: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        res = res[part]
    return res


def check_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    gpu_ran = "gpu" in res and "skipped" not in res["gpu"]
    for key, (op, goal, what) in {**TARGETS, **(GPU_TARGETS if gpu_ran else {})}.items():
        value = float(_get(res, key))
        out.append(
            {
                "target": what,
                "key": key,
                "value": round(value, 4),
                "goal": f"{op} {goal}",
                "met": value >= goal if op == ">=" else value <= goal,
            }
        )
    return out


LABELS = {
    "tutorial": "(a) tutorial: ImageFolder + PIL + torchvision",
    "kpipe_files": "(b) kpipe loader, from files (albumentations 'medium')",
    "kpipe_cache": "(c) kpipe loader, from the cache",
    "kpipe_cache_batch_aug": "(d) kpipe data.batch_aug: cached batches -> BatchAugment on the consumer",
    "ceiling_cache_to_float": "ceiling: cache -> normalised float batch (in-process), no augmentation",
    "ceiling_decode": "ceiling: decode only (image.read_rgb, one thread per core)",
    "kpipe_infer": "kpipe infer loop (JPEGs -> eval loader -> model), fp32, no TTA",
    "kpipe_infer_hflip": "kpipe infer loop, fp32, hflip TTA (2 views in one forward)",
    "kpipe_infer_auto": "kpipe infer loop, infer.precision=auto's form (bf16 + channels_last where native), no TTA",
    "kpipe_infer_compiled": "kpipe infer loop, auto's form + infer.compile (weights frozen), no TTA",
    "kpipe_infer_openvino": "kpipe infer loop, infer.runtime=openvino (bf16 hint where native), no TTA",
    "fp32": "model alone (random batch): fp32, no TTA",
    "fp32_hflip": "fp32, hflip TTA (2 views)",
    "fp32_channels_last": "fp32 + channels_last",
    "bf16": "bf16 autocast",
    "bf16_channels_last": "bf16 autocast + channels_last",
    "bf16_channels_last_hflip": "bf16 + channels_last, hflip TTA",
    "bf16_channels_last_compiled": "bf16 + channels_last, torch.compile (weights frozen on CPU)",
    "fp32_channels_last_compiled": "fp32 + channels_last, torch.compile (weights frozen on CPU)",
    "openvino_bf16": "OpenVINO, INFERENCE_PRECISION_HINT bf16 (nn.runtime)",
    "openvino_f32": "OpenVINO, INFERENCE_PRECISION_HINT f32 (no native bf16)",
    "kpipe": "kpipe engine.train_epoch",
    "bare": "bare hand-written loop",
    "kpipe_fp32": "kpipe engine.train_epoch, fp32 (cuDNN's default TF32 convolutions), no channels_last",
    "timm_train": "timm's pipeline: create_dataset -> create_loader (prefetcher) -> AMP step (timm_ref.py)",
    "kpipe_train_uncached": "kpipe: JPEGs -> ImageDataset workers -> engine.train_epoch",
    "kpipe_train_cached": "kpipe: decode-once cache -> ImageDataset workers -> engine.train_epoch",
    "kpipe_train_cached_batch_aug": "kpipe data.batch_aug: cached batches -> BatchAugment on the GPU -> train_epoch",
    "infer_loader_cpu_decode": "kpipe eval loader alone, infer.decode=cpu (workers decode + resize)",
    "infer_loader_gpu_decode": "kpipe eval loader alone, infer.decode=gpu (nvJPEG + resize on the GPU)",
    "kpipe_infer_cpu_decode": "kpipe infer loop, infer.decode=cpu, auto precision + channels_last",
    "kpipe_infer_gpu_decode": "kpipe infer loop, infer.decode=gpu, auto precision + channels_last",
}


BASES = {
    "tutorial",
    "kpipe_infer",
    "fp32",
    "bare",
    "timm_train",
}  # the cases other rows of their section are compared with


def section_rows(sec: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(case, median, min-max, ratio) for every case of a section; ratio to the section's base if any."""
    ratios = sec.get("ratios", {})
    rows = []
    for key, val in sec.items():
        if not (isinstance(val, dict) and "median" in val):
            continue
        ratio = f"{ratios[key]:.2f}x" if key in ratios else ("1.00x" if ratios and key in BASES else "")
        rows.append(
            (LABELS.get(key, key), f"{val['median']:,.1f}", f"{val['min']:,.1f}–{val['max']:,.1f}", ratio)
        )
    return rows


def _sections(res: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    p = res["plan"]
    ct, cd = res["data"].get("consumer_threads"), res["data"].get("consumer_device", "cpu")
    out = [
        (
            f"Data: ready training batches/s on {cd} (batch {p['batch']}, {p['img_size']} px, {p['workers']} workers"
            + (f" and a {ct}-thread consumer" if ct else "")
            + f", {p['n_images']} JPEGs {p['photo_hw'][1]}x{p['photo_hw'][0]}), img/s, ratio to (a)",
            res["data"],
        ),
        (
            f"Inference: {p['model']} at {p['img_size']} px, batch {p['batch']}, CPU, img/s, ratio to kpipe infer",
            res["inference"],
        ),
        (
            f"Training: {p['model']} at {p['train_size']} px, batch {p['batch']}, fp32, CPU, in-memory batches, img/s",
            res["training"],
        ),
    ]
    g = res["gpu"]
    if "skipped" not in g:
        out += [
            (
                f"GPU training: {g['model']} at {g['img_size']} px, batch {g['batch']} ({g['device']}), img/s",
                g["training"],
            ),
            (f"GPU inference: {g['model']} at {g['img_size']} px, batch {g['batch']}, img/s", g["inference"]),
        ]
        if "e2e" in g:
            out.append(
                (
                    f"GPU end to end: {g['model']} training from the {p['n_images']} JPEGs, {g['img_size']} px, "
                    f"batch {g['batch']}, {g['e2e']['workers']} workers per loader, vs timm's pipeline, img/s",
                    g["e2e"],
                )
            )
        if "decode" in g:
            out.append(
                (
                    f"GPU decode: kpipe's inference loader over the {p['n_images']} JPEGs, {g['model']} at "
                    f"{g['img_size']} px, batch {g['batch']}, {g['decode']['workers']} workers, img/s",
                    g["decode"],
                )
            )
    return out


def print_table(res: dict[str, Any]) -> None:
    table = Table(title="kpipe bench (median of the repetitions)")
    for col, just in (("case", "left"), ("img/s", "right"), ("min–max", "right"), ("ratio", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for title, sec in _sections(res):
        table.add_row(f"[bold]{title}", "", "", "")
        for row in section_rows(sec):
            table.add_row(*row)
        for name, value in sec.get("ratios", {}).items():
            if name not in sec:
                table.add_row(f"  ratio {name}", "", "", f"{value:.2f}x")
        table.add_section()
    console.print(table)
    for line in form_lines(res["inference"]):
        console.print(line)
    if "skipped" in res["gpu"]:
        console.print(f"GPU: {res['gpu']['skipped']}")
    targets = Table(title="targets")
    for col in ("target", "measured", "goal", "met"):
        targets.add_column(col)
    for t in res["targets"]:
        targets.add_row(t["target"], f"{t['value']:.2f}", t["goal"], "[green]yes" if t["met"] else "[red]no")
    console.print(targets)


def auto_line(auto: dict[str, Any]) -> str:
    return (
        f"infer.precision=auto's form here: {auto['form']}; against the fp32 loop on the same {auto['images']} "
        f"images (random weights): argmax agreement {auto['argmax_agreement']:.2%}, max probability difference "
        f"{auto['max_prob_diff']:.4f}."
    )


def best_line(inf: dict[str, Any]) -> str:
    best = inf["best_form"]
    return (
        f"kpipe infer's fastest CPU form here (no TTA): {best['form']} ({best['case']}), "
        f"{inf['ratios']['kpipe_infer_best']:.2f}x the fp32 loop; against it on the same {best['images']} images "
        f"(random weights): argmax agreement {best['argmax_agreement']:.2%}, max probability difference "
        f"{best['max_prob_diff']:.4f}. kpipe infer keeps OpenVINO or bf16 only after its own check on the "
        "run's validation images."
    )


def form_lines(inf: dict[str, Any]) -> list[str]:
    """The sentences under the inference table: auto's form, the best form, OpenVINO's absence."""
    out = [auto_line(inf["auto_precision"])] if inf.get("auto_precision") else []
    out += [best_line(inf)] if inf.get("best_form") else []
    out += [f"OpenVINO rows not run: {inf['openvino_skipped']}."] if inf.get("openvino_skipped") else []
    return out


def _md_table(header: list[str], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render_md(res: dict[str, Any]) -> str:
    m, la = res["machine"], res["load_average"]
    parts = [
        "# kpipe bench\n",
        f"`{res['command']}` on {res['date']}, {res['seconds']:.0f} s.\n",
        f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}, native CPU bf16: "
        f"{'yes' if m['cpu_bf16'] else 'no'}), GPU: {m['cuda'] or 'none'}. Python {m['python']}, torch {m['torch']}, "
        f"torchvision {m['torchvision']}, timm {m['timm']}, albumentations {m['albumentations']}, OpenCV {m['cv2']}, "
        f"numpy {m['numpy']}, Pillow {m['pillow']}. Load average (1 min) before the run: {la['start']}"
        + (" — other work was running, so these figures are lower bounds." if la["start"] > 0.5 else ".")
        + "\n",
        "Figures are medians over the repetitions (run interleaved), with their min–max; ratios are ratios of medians.\n",
        "## Targets\n",
        _md_table(
            ["target", "measured", "goal", "met"],
            [
                (t["target"], f"{t['value']:.2f}", t["goal"], "yes" if t["met"] else "**no**")
                for t in res["targets"]
            ],
        ),
    ]
    for title, sec in _sections(res):
        parts += [f"\n## {title}\n", _md_table(["case", "img/s", "min–max", "ratio"], section_rows(sec))]
        extra = [(k, f"{v:.2f}x") for k, v in sec.get("ratios", {}).items() if k not in sec]
        if extra:
            parts.append("\n" + _md_table(["ratio", "value"], extra))
        if "breakdown_ms_per_image" in sec:
            rows = [(k, f"{v:.3f}") for k, v in sec["breakdown_ms_per_image"].items()]
            parts += [
                "\nWhere the time goes (one core, main process, ms per image):\n",
                _md_table(["step", "ms/image"], rows),
            ]
    parts += [f"\n{line}" for line in form_lines(res["inference"])]
    if "skipped" in res["gpu"]:
        parts.append(f"\n## GPU\n\n{res['gpu']['skipped']}.")
    parts.append(
        f"\nWhat each row measures, how, and why its target is set there: {DOC} in kpipe's repository."
    )
    return "\n".join(parts) + "\n"
