"""`kpipe package`: the runs `kpipe infer` would use, as a Kaggle dataset for an internet-off notebook.

Takes the same plan as `kpipe infer` (infer.runs / infer.tta, or infer.ensemble_weights) and writes
package/<name>/ in kpipe.kaggle.package's format: each fold's weights as safetensors with its
classes and preprocessing beside, the resolved configs, classes, class prior, views and blend
weights, validation images for the notebook's agreement checks (check/, package.check_images), a kpipe
wheel, a manifest (sizes, sha256) and dataset-metadata.json. It is built in a
scratch folder and swapped in whole, refused over package.max_mb with a breakdown of the sizes.
package.bundle_deps (or --bundle-deps) adds wheels of named libraries for the notebook to install offline.
`--upload` creates the Kaggle dataset, or a new version of it, and waits until Kaggle has it ready.
Usage: ``kpipe package -c configs/exp/b0.yaml --comp demo package.owner=me [--upload]``
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from rich.table import Table

from kpipe import paths
from kpipe.config import Config, load_run_config
from kpipe.console import console, safe, warn
from kpipe.data import ingest
from kpipe.data.folds import check_sample, load_fold_table
from kpipe.errors import KpipeError, preview
from kpipe.io import read_csv_ids, write_json, write_yaml
from kpipe.kaggle import package as pkg
from kpipe.nn.plan import Plan, class_prior, make_plan

MB = 1024 * 1024


def owner(cfg: Config) -> str:
    found = cfg.package.owner or os.environ.get("KAGGLE_USERNAME")
    if not found:
        raise KpipeError(
            "no Kaggle owner for the dataset id (<owner>/<slug>): set package.owner=<your Kaggle user "
            "name> (or $KAGGLE_USERNAME)."
        )
    return found


def run_tags(runs: list[str]) -> dict[str, str]:
    """runs/<tag> per run folder: its name, numbered when two runs share one."""
    short = [Path(r).name for r in runs]
    tags = short if len(set(short)) == len(short) else [f"{i}-{s}" for i, s in enumerate(short)]
    return dict(zip(runs, tags, strict=True))


def fold_checkpoints(run: str) -> dict[int, Path]:
    """fold<k>/best.pt by k, then full/best.pt (a `kpipe train --full` model) as paths.FULL_FOLD: every model
    `kpipe infer` would use, in its order."""
    found = {
        int(p.parent.name[4:]): p
        for p in Path(run).glob("fold*/best.pt")
        if re.fullmatch(r"fold\d+", p.parent.name)
    }
    full = paths.RunDir(Path(run)).full.best
    if not found and not full.is_file():
        raise KpipeError(
            f"{run}: no fold<k>/best.pt or full/best.pt to package. Train the run first (kpipe train)."
        )
    return dict(sorted(found.items())) | ({paths.FULL_FOLD: full} if full.is_file() else {})


def make_spec(
    cfg: Config, plan: Plan, classes: list[str], tags: dict[str, str], folds: dict[str, list[int]]
) -> pkg.PackageSpec:
    prior = class_prior(read_csv_ids(paths.folds_csv(cfg))["label"].tolist(), classes)
    weights = (
        None
        if plan.weights is None
        else [{"run": tags[r], "view": v, "weight": w} for (r, v), w in plan.weights.items()]
    )
    cv = plan.cv
    if cv is None and len(plan.runs) == 1 and (Path(plan.runs[0]) / "cv.json").is_file():
        saved = json.loads((Path(plan.runs[0]) / "cv.json").read_text(encoding="utf-8"))
        cv = float(saved["cv"]) if saved.get("metric") == cfg.competition.metric else None
    runs = [pkg.PackagedRun(tags[r], str(r), folds[r], plan.views[r]) for r in plan.runs]
    return pkg.PackageSpec(
        paths.package_name(cfg),
        classes,
        [float(p) for p in prior],
        runs,
        weights,
        plan.how,
        cv,
        cfg.competition.metric,
    )


def write_package(cfg: Config, out: Path, runs: list[str] | None) -> dict[str, Any]:
    """Every file of the package under `out` (a fresh folder); returns its manifest."""
    slug = pkg.kaggle_slug_of(paths.package_name(cfg), "package.name")  # the cheap checks first
    metadata = pkg.dataset_metadata(
        owner(cfg), slug, cfg.package.title or f"kpipe {slug}"[:50], cfg.package.license
    )
    classes = ingest.load_classes(cfg)
    plan = make_plan(cfg, runs, classes)
    tags = run_tags(plan.runs)
    folds: dict[str, list[int]] = {}
    where = paths.PackageDir(out)
    for r in plan.runs:
        rcfg = load_run_config(r)  # validated: the notebook rebuilds models from it
        dest = where.run(tags[r])
        write_yaml(dest / "config.yaml", rcfg.to_dict())
        ckpts = fold_checkpoints(r)
        for k, best in ckpts.items():
            pkg.export_fold(best, dest, k)
            got = pkg.read_fold_classes(dest, k)
            if got != classes:
                raise KpipeError(
                    f"{best}: trained on classes {preview(got)}, but {paths.classes_json(cfg)} lists "
                    f"{preview(classes)}. Re-train the run, or leave it out of infer.runs."
                )
        folds[r] = list(ckpts)
    write_check(cfg, plan, tags, folds, where)
    spec = make_spec(cfg, plan, classes, tags, folds)
    write_json(where.spec, spec.to_dict())
    write_yaml(where.config, cfg.to_dict())
    write_json(where.classes, {"classes": classes})
    pkg.build_wheel(where.wheels)
    if cfg.package.bundle_deps:
        got = pkg.download_wheels(
            pkg.dependency_specs(cfg.package.bundle_deps),
            where.wheels / "deps",
            cfg.package.python,
            cfg.package.platform,
        )
        console.print(f"bundled {len(got)} wheels for the notebook: {safe(', '.join(p.name for p in got))}")
    write_json(where.metadata, metadata)
    return pkg.manifest(out)


def write_check(
    cfg: Config, plan: Plan, tags: dict[str, str], folds: dict[str, list[int]], where: paths.PackageDir
) -> None:
    """check/: package.check_images validation images spread over the packaged folds, at the largest image size
    among the runs, for the notebook's agreement checks (said aloud when the folds table cannot be read)."""
    if cfg.package.check_images == 0:
        return
    try:
        table = load_fold_table(cfg)[0]
    except KpipeError as e:
        warn(f"no check images in the package, so the notebook will predict in fp32: {e}")
        return
    size = max(
        int(
            json.loads(paths.package_fold_json(where.run(tags[r]), k).read_text(encoding="utf-8"))[
                "data_config"
            ]["img_size"]
        )
        for r in plan.runs
        for k in folds[r]
    )
    wanted = sorted({k for r in plan.runs for k in folds[r]})
    n = pkg.write_check_images(check_sample(table, wanted, cfg.package.check_images), where.root, size)
    console.print(f"check/: {n} validation images at {size} px for the notebook's agreement checks")


def check_size(cfg: Config, man: dict[str, Any], where: Path) -> None:
    limit = cfg.package.max_mb * MB
    if man["bytes"] <= limit:
        return
    parts = "\n".join(f"  {name}: {size / MB:,.1f} MB" for name, size in pkg.size_breakdown(man["files"]))
    raise KpipeError(
        f"{where}: the package would be {man['bytes'] / MB:,.1f} MB, over package.max_mb="
        f"{cfg.package.max_mb:g} MB:\n{parts}\nPackage fewer runs or folds (infer.runs=..., "
        "infer.ensemble_weights=...), or raise package.max_mb."
    )


def run(cfg: Config, runs: list[str] | None = None, upload: bool = False) -> dict[str, Any]:
    """Write package/<name>/ (replacing an older one whole); with `upload`, send it to Kaggle and wait until ready."""
    root = paths.package_dir(cfg).root
    scratch = root.with_name(root.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        man = write_package(cfg, scratch, runs)
        check_size(cfg, man, root)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    write_json(scratch / "manifest.json", man)
    old = root.with_name(root.name + ".old")
    if root.exists():
        shutil.rmtree(old, ignore_errors=True)
        root.rename(old)
    scratch.rename(root)
    shutil.rmtree(old, ignore_errors=True)
    _print(root, man)
    if upload:
        from kpipe.kaggle import datasets

        datasets.upload(root, f"kpipe package {man['sha256'][:12]}")
    return man


def _print(root: Path, man: dict[str, Any]) -> None:
    console.print(f"{safe(root)}: {len(man['files'])} files, {man['bytes'] / MB:,.2f} MB", soft_wrap=True)
    table = Table()
    table.add_column("part")
    table.add_column("MB", justify="right")
    for name, size in pkg.size_breakdown(man["files"]):
        table.add_row(safe(name), f"{size / MB:,.2f}")
    console.print(table)
    console.print(
        f"[bold green]wrote {safe(root)}[/] (sha256 {man['sha256'][:12]}); render the notebook with "
        "`kpipe kernel`"
    )
