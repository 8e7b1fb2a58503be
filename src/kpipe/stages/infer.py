"""`kpipe infer` and `kpipe oof-tta`: fold models x TTA views x runs -> probabilities and a checked submission.

Each run (a folder written by `kpipe train`) predicts with its own model and preprocessing (its
config.yaml and the data_config in its checkpoints). The test images are decoded once per run;
every batch goes through all of the run's fold models, each with all TTA views in one forward
(tta.predict_batched). Probabilities are averaged over views and folds, then runs (infer.agg), or
blended with the weights `kpipe ensemble` fitted (infer.ensemble_weights: members are (run, view),
each the fold average). Missing or undecodable test images still get a row: the class prior of
the training labels, with a warning. Each run predicts in the form infer.precision picks
(nn.precision: with `auto`, bf16 / AMP only after it agreed with fp32 on a sample of the run's own
validation images) and through the runtime infer.runtime picks (nn.runtime: OpenVINO on the CPU only
after the same check; infer.compile for torch), both recorded per run in the sidecar, as is where its
JPEGs were decoded (infer.decode: on the GPU with `auto` only when a timing of the first batches finds it
faster). `kpipe oof-tta` runs in torch. `run_oof_tta` predicts
each fold's own validation images with every view (runs/<exp>/oof_tta/<view>.csv), so `kpipe ensemble`
can weigh views, and shows each view's CV.

Writes predictions/<name>/{probs.csv, ids.csv, classes.json, members.json, members/*.npy},
submissions/<name>.csv (validated before it is written) and submissions/<name>.json (what made it).
The per-member .npy files are float32, float16 or not written (infer.save_views: 100k images x 1,000
classes x 5 folds x 8 views is 16 GB in float32); free disk space is checked before anything is written.
Usage: ``kpipe infer -c configs/exp/b0.yaml --comp demo infer.tta=identity,hflip``
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console, print_problems, safe
from kpipe.data import ingest, transforms
from kpipe.data.folds import check_sample, load_fold_table
from kpipe.errors import KpipeError, preview
from kpipe.eval import metrics
from kpipe.eval.blend import RANK_MEAN, blend, check_finite
from kpipe.eval.oof import load_members, read_oof
from kpipe.io import atomic_path, check_free_space, read_csv_ids, write_csv, write_json
from kpipe.kaggle import ledger, submission
from kpipe.kaggle.package import PackageSpec, read_check, read_spec
from kpipe.nn import dist, precision, predict, runtime, tta
from kpipe.nn.engine import autocast
from kpipe.nn.plan import Plan, class_prior, make_plan, resolve_runs

__all__ = ["Plan", "class_prior", "make_plan", "package_plan", "resolve_runs", "run", "run_oof_tta"]


@dataclass(frozen=True)
class MemberPred:
    run: str
    fold: int
    view: str
    probs: np.ndarray  # (N, K) float32, test order


# ------------------------------------------------------------------ pure helpers


def blend_members(
    members: list[MemberPred], how: str, weights: dict[tuple[str, str], float] | None
) -> np.ndarray:
    """Final (N, K) probabilities: mean over views and folds within each run, then over runs;
    or, with weights, each (run, view) averaged over folds and blended with its weight."""
    if weights is None:
        runs = list(dict.fromkeys(m.run for m in members))
        per_run = [
            tta.aggregate(np.stack([m.probs for m in members if m.run == r]).astype(np.float64), how)
            for r in runs
        ]
        return per_run[0] if len(per_run) == 1 else tta.aggregate(np.stack(per_run), how)
    keys = list(weights)
    within = "mean" if how == RANK_MEAN else how  # a rank blend ranks each member's fold-mean probabilities
    per_key = [
        tta.aggregate(np.stack([m.probs for m in members if (m.run, m.view) == k]).astype(np.float64), within)
        for k in keys
    ]
    return blend(per_key, np.array([weights[k] for k in keys]), how)


# ------------------------------------------------------------------ models and prediction


def sample_check(
    cfg: Config, rm: predict.RunModels, device: torch.device, table: pd.DataFrame | KpipeError
) -> Callable[..., np.ndarray] | None:
    """The predictor both checks (infer.precision, infer.runtime) run on a sample of the run's own validation
    images (each fold model on its own fold); None, said aloud, when the folds table could not be read."""
    if isinstance(table, KpipeError):
        console.print(f"[yellow]{safe(rm.run)}: no agreement check: {safe(str(table))}", soft_wrap=True)
        return None
    sample = check_sample(table, rm.folds, cfg.infer.precision_check_images)
    if not any(sample.values()):
        return None
    return predict.sample_predictor(rm, sample, cfg.infer.batch_size, device, cfg.infer.channels_last)


def choose_precision(
    cfg: Config,
    rm: predict.RunModels,
    device: torch.device,
    table: pd.DataFrame | KpipeError,
    sampler: Callable[..., np.ndarray] | None = None,
) -> precision.PrecisionChoice:
    """infer.precision for this run; with `auto`, the proposal is checked on the run's own validation images
    (each fold model on a sample of its fold: `table` is the folds table, or why it could not be read;
    `sampler`, when given, is sample_check's predictor for it)."""
    inf = cfg.infer
    check = None
    if inf.precision == "auto" and precision.native_fast(device)[0] is not None:
        check = sampler or sample_check(cfg, rm, device, table)
    choice = precision.choose(inf.precision, device, inf.channels_last, check)
    console.print(f"{safe(rm.run)}: precision {choice.reason}", soft_wrap=True)
    return choice


def _example(cfg: Config, rm: predict.RunModels, rows: int, device: torch.device, cl: bool) -> torch.Tensor:
    """A normalised-looking batch of `rows` at the run's image size: what conversion and warm-up trace with."""
    s = int(rm.data_cfg["img_size"])
    x = torch.randn(rows, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def choose_forms(
    cfg: Config,
    rm: predict.RunModels,
    device: torch.device,
    table: pd.DataFrame | KpipeError,
    n_views: int,
) -> tuple[predict.RunModels, precision.PrecisionChoice, runtime.RuntimeChoice]:
    """infer.runtime, then (when torch runs) infer.precision and infer.compile for this run: (the run with the
    models that will predict, the precision record, the runtime record)."""
    inf = cfg.infer
    need = (inf.runtime != "torch" and device.type == "cpu") or (
        inf.precision == "auto" and precision.native_fast(device)[0] is not None
    )
    sampler = sample_check(cfg, rm, device, table) if need else None  # both checks share its fp32 result

    took: list[float] = []

    def convert(hint: str) -> list[torch.nn.Module]:
        x, t0 = _example(cfg, rm, 2, device, False), time.perf_counter()
        out = [runtime.to_openvino(m, x, hint) for m in rm.models]
        took.append(round(time.perf_counter() - t0, 2))
        return out

    rt, ov_models = runtime.choose(inf.runtime, device, convert, sampler)
    rt = replace(rt, convert_seconds=took[0] if took else None)
    console.print(f"{safe(rm.run)}: runtime {rt.reason}", soft_wrap=True)
    if ov_models is not None:
        why = f"OpenVINO runs the models (INFERENCE_PRECISION_HINT {rt.hint}); torch applies the TTA views in fp32"
        choice = precision.PrecisionChoice("fp32", False, why, rt.check)
        rt = replace(
            rt, compile={"compiled": False, "reason": "infer.compile is ignored: OpenVINO runs the models"}
        )
        return predict.RunModels(rm.run, rm.cfg, rm.folds, ov_models, rm.data_cfg), choice, rt
    choice = choose_precision(cfg, rm, device, table, sampler)
    if not inf.compile:
        return rm, choice, replace(rt, compile={"compiled": False, "reason": "infer.compile=false"})
    x = _example(cfg, rm, inf.batch_size * n_views, device, choice.channels_last)
    compiled, seconds = [], 0.0
    for m in rm.models:
        c, t = runtime.compile_torch(m, x, device, lambda: autocast(device, choice.amp_dtype))
        compiled.append(c)
        seconds += t
    frozen = " with frozen weights" if device.type == "cpu" else ""
    console.print(
        f"{safe(rm.run)}: torch.compile{frozen}, {len(compiled)} folds, {seconds:.1f} s with warm-up"
    )
    record = {"compiled": True, "reason": f"infer.compile=true{frozen}", "seconds": round(seconds, 2)}
    return (
        predict.RunModels(rm.run, rm.cfg, rm.folds, compiled, rm.data_cfg),
        choice,
        replace(rt, compile=record),
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _predict_run(
    cfg: Config,
    rm: predict.RunModels,
    files: list[str],
    views: list[str],
    n_classes: int,
    device: torch.device,
    tolerant: bool,
    label: str,
    choice: precision.PrecisionChoice,
    decode: str = "cpu",
) -> tuple[np.ndarray, np.ndarray, float]:
    """All fold models of a run on `files`, the JPEGs decoded where `decode` says (cpu | gpu); returns
    (probs (F, V, N, K), ok (N,), images/s)."""
    loader = predict.make_eval_loader(
        files, rm.data_cfg, cfg.infer.batch_size, cfg.data.num_workers, device, tolerant, decode
    )
    start = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task(label, total=len(files))
        prepare = transforms.Normalize(rm.data_cfg["mean"], rm.data_cfg["std"])
        probs, ok = predict.predict_models(
            rm.models,
            loader,
            views,
            n_classes,
            device,
            choice.amp_dtype,
            choice.channels_last,
            prepare,
            lambda n: progress.advance(task, n),
        )
    return probs, ok, len(files) / max(time.perf_counter() - start, 1e-9)


def choose_decode(
    cfg: Config, rm: predict.RunModels, files: list[str], device: torch.device
) -> predict.DecodeChoice:
    """infer.decode for this run (at its image size); with auto on CUDA, both decoders timed on the first files."""
    inf = cfg.infer
    choice = predict.choose_decode(
        inf.decode,
        device,
        lambda: predict.decode_rates(files, rm.data_cfg, inf.batch_size, cfg.data.num_workers, device),
    )
    console.print(f"{safe(rm.run)}: decode {choice.reason}", soft_wrap=True)
    return choice


def _fold_table(cfg: Config) -> pd.DataFrame | KpipeError:
    """The folds table (path, fold) for the precision and runtime checks, or why it cannot be read (then the
    checks are skipped, said aloud). With infer.package, the validation images `kpipe package` put in it."""
    if cfg.infer.precision != "auto" and cfg.infer.runtime == "torch":
        return KpipeError("infer.precision is not auto and infer.runtime is torch")
    try:
        if cfg.infer.package:
            return read_check(Path(cfg.infer.package))
        return load_fold_table(cfg)[0]
    except KpipeError as e:
        return e


# ------------------------------------------------------------------ kpipe infer


def package_plan(root: Path, spec: PackageSpec, runs: list[str] | None) -> Plan:
    """The plan a package was made with, its runs at their place inside the package folder."""
    if runs:
        raise KpipeError(f"infer.package={root} brings its own runs; leave out --runs / infer.runs.")
    where = {r.tag: str(paths.PackageDir(root).run(r.tag)) for r in spec.runs}
    weights = (
        None
        if spec.weights is None
        else {(where[w["run"]], w["view"]): float(w["weight"]) for w in spec.weights}
    )
    return Plan(list(where.values()), {where[r.tag]: r.views for r in spec.runs}, weights, spec.how, spec.cv)


def run(cfg: Config, runs: list[str] | None = None) -> dict[str, Any]:
    """Predict the test set with every fold of every run and TTA view; write predictions and a validated submission.

    With infer.package (a `kpipe package` folder, as in the Kaggle notebook) the runs, views, weights,
    classes and class prior come from the package instead of runs/ and folds/.
    """
    device = dist.pick_device(cfg.train.device, cfg.train.cudnn_benchmark)
    spec = read_spec(Path(cfg.infer.package)) if cfg.infer.package else None
    classes = spec.classes if spec else ingest.load_classes(cfg)
    plan = (
        make_plan(cfg, runs, classes) if spec is None else package_plan(Path(cfg.infer.package), spec, runs)
    )
    test = ingest.load_test(cfg)
    files, ids = test["path"].tolist(), test["id"].tolist()
    ok = test["found"].to_numpy(bool).copy()
    members: list[MemberPred] = []
    folds: dict[str, list[int]] = {}
    forms: dict[str, dict[str, Any]] = {}
    runtimes: dict[str, dict[str, Any]] = {}
    decodes: dict[str, dict[str, Any]] = {}
    by_size: dict[int, predict.DecodeChoice] = {}  # runs at one image size share the decoder timing
    table = _fold_table(cfg)
    for r in plan.runs:
        rm = predict.load_run(r, classes, device, cfg.infer.channels_last)
        views = plan.views[r]
        rm, choice, rt = choose_forms(cfg, rm, device, table, len(tta.parse_views(views)))
        forms[r], runtimes[r] = choice.to_json(), rt.to_json()
        size = int(rm.data_cfg["img_size"])
        decode = by_size[size] = by_size.get(size) or choose_decode(cfg, rm, files, device)
        decodes[r] = decode.to_json()
        probs, good, rate = _predict_run(
            cfg, rm, files, views, len(classes), device, True, f"infer {r}", choice, decode.name
        )
        for f, k in enumerate(rm.folds):
            for j, v in enumerate(views):
                check_finite(probs[f, j], f"{r}/fold{k}/best.pt, TTA view {v}, on the test images")
        console.print(
            f"{r}: {len(files)} test images x {len(rm.folds)} folds x {len(views)} views "
            f"at {rm.data_cfg['img_size']} px, {rate:.1f} images/s on {device} ({_form(choice, rt)}, "
            f"{decode.name} decoding)"
        )
        ok &= good
        folds[r] = rm.folds
        members += [
            MemberPred(r, k, v, probs[f, j]) for f, k in enumerate(rm.folds) for j, v in enumerate(views)
        ]
        del rm, probs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bad = ~ok
    prior = None
    if bad.any():
        prior = (
            np.array(spec.prior)
            if spec
            else class_prior(read_csv_ids(paths.folds_csv(cfg))["label"].tolist(), classes)
        )
    if prior is not None:
        for m in members:
            m.probs[bad] = prior
    final = blend_members(members, plan.how, plan.weights)
    _warn_unreadable(test, ok)
    name = cfg.infer.name or cfg.name
    out_dir = paths.predictions_dir(cfg, name)
    write_predictions(
        out_dir, ids, classes, final, members, test.loc[bad, ["id", "found", "reason"]], cfg.infer.save_views
    )
    sub_path = paths.submission_csv(cfg, name)
    write_submission(cfg, final, ids, classes, sub_path)
    cv_value, cv_source = (spec.cv, "the package's CV") if spec else _cv(cfg, plan)
    sidecar = {
        "runs": plan.runs,
        "cv": cv_value,
        "cv_source": cv_source,
        "metric": cfg.competition.metric,
        "folds": folds,
        "precision": forms,
        "runtime": runtimes,
        "decode": decodes,
        "tta": list(dict.fromkeys(v for r in plan.runs for v in plan.views[r])),
        "agg": plan.how,
        "weights": None
        if plan.weights is None
        else [{"run": r, "view": v, "weight": w} for (r, v), w in plan.weights.items()],
        "ensemble_weights": cfg.infer.ensemble_weights,
        "n_test": len(ids),
        "n_unreadable": int(bad.sum()),
        "predictions": str(out_dir),
        # `kpipe submit` refuses a sidecar whose sha256 is not its CSV's (a kill between the two writes)
        "sha256": ledger.sha256_file(sub_path),
    }
    write_json(paths.sidecar(sub_path), sidecar)
    cv = f"CV {sidecar['metric']} {cv_value:.4f}, {cv_source}" if cv_value is not None else "no CV"
    console.print(f"[bold green]wrote {sub_path}[/] ({len(ids)} rows, {cv}); probabilities in {out_dir}")
    return {**sidecar, "submission": str(sub_path), "unreadable": test.loc[bad, "id"].tolist()}


def _form(choice: precision.PrecisionChoice, rt: runtime.RuntimeChoice) -> str:
    if rt.name == "openvino":
        return f"OpenVINO {rt.hint}"
    compiled = ", compiled" if rt.compile and rt.compile.get("compiled") else ""
    return f"{choice.name}{', channels_last' if choice.channels_last else ''}{compiled}"


def _warn_unreadable(test: pd.DataFrame, ok: np.ndarray) -> None:
    bad = test.loc[~ok]
    if bad.empty:
        return
    outside = bad.loc[bad["reason"] == ingest.OUTSIDE, "id"].tolist()
    missing = int((~bad["found"]).sum()) - len(outside)
    refused = f", {len(outside)} refused: id outside the test folder" if outside else ""
    console.print(
        f"[yellow]warning: {len(bad)} test images could not be read ({missing} missing, "
        f"{len(bad) - missing - len(outside)} not decodable{refused}):[/] {safe(preview(bad['id'].tolist()))}. "
        "They get the class prior of the training labels; see unreadable.csv beside probs.csv.",
        soft_wrap=True,
    )


VIEW_DTYPES = {"float32": np.float32, "float16": np.float16}
CSV_BYTES_PER_VALUE = 24  # a probability printed by pandas: up to ~20 digits and a comma (an upper bound)


def predictions_bytes(n: int, k: int, n_members: int, save_views: str | bool) -> int:
    """Bytes predictions/<name>/ will take: probs.csv plus one (n, k) .npy per member unless save_views is off."""
    per_value = np.dtype(VIEW_DTYPES[save_views]).itemsize if save_views else 0
    return n * k * (CSV_BYTES_PER_VALUE + n_members * per_value) + n * 64


def write_predictions(
    out_dir: Path,
    ids: list[str],
    classes: list[str],
    final: np.ndarray,
    members: list[MemberPred],
    unreadable: pd.DataFrame,
    save_views: str | bool = "float32",
) -> None:
    """probs.csv (the blend), ids.csv, classes.json, and one (N, K) .npy per (run, fold, view) in the
    save_views dtype (none when False; members.json then lists them with file null)."""
    check_free_space(
        out_dir,
        predictions_bytes(len(ids), len(classes), len(members), save_views),
        f"the test predictions ({len(members)} members x {len(ids)} images x {len(classes)} classes)",
        "paths.predictions_dir, or infer.save_views=float16 / false",
    )
    probs = pd.DataFrame(final, columns=[f"p_{c}" for c in classes])
    write_csv(out_dir / "probs.csv", pd.concat([pd.DataFrame({"id": ids}), probs], axis=1))
    write_csv(out_dir / "ids.csv", pd.DataFrame({"id": ids}))
    write_json(out_dir / "classes.json", classes)
    runs = list(dict.fromkeys(m.run for m in members))
    short = [Path(r).name for r in runs]
    # Two runs with one folder name (runs/a/x, other/x) would overwrite each other's files.
    tag = dict(
        zip(
            runs,
            short if len(set(short)) == len(short) else [f"{i}-{s}" for i, s in enumerate(short)],
            strict=True,
        )
    )
    index = []
    for m in members:
        rel = f"members/{tag[m.run]}_fold{m.fold}_{m.view}.npy" if save_views else None
        if rel is not None:
            with atomic_path(out_dir / rel) as tmp, open(tmp, "wb") as fh:
                np.save(fh, m.probs.astype(VIEW_DTYPES[save_views]))
        index.append(
            {
                "run": m.run,
                "fold": m.fold,
                "view": m.view,
                "file": rel,
                "dtype": save_views if save_views else None,
            }
        )
    write_json(out_dir / "members.json", index)
    reasons = np.where(unreadable["found"].to_numpy(bool), "not decodable", unreadable["reason"].astype(str))
    write_csv(out_dir / "unreadable.csv", pd.DataFrame({"id": unreadable["id"].tolist(), "reason": reasons}))


def write_submission(
    cfg: Config, probs: np.ndarray, ids: list[str], classes: list[str], path: Path
) -> pd.DataFrame:
    """The submission in sample_submission's shape; refused (KpipeError) when validation finds an error."""
    c = cfg.competition
    sample = ingest.read_sample_submission(cfg)
    sub = submission.make_submission(probs, ids, classes, sample, c)
    problems = submission.validate_submission(sub, sample, classes, c.sub_id_col, c.submission_format)
    print_problems([p for p in problems if p.severity != "error"])
    errors = [p.render() for p in problems if p.severity == "error"]
    if errors:
        raise KpipeError(
            f"refusing to write {path}: it would not match sample_submission:\n  " + "\n  ".join(errors)
        )
    write_csv(path, sub)
    return sub


def _cv(cfg: Config, plan: Plan) -> tuple[float | None, str]:
    """(CV, what it measures) for the sidecar: never a TTA submission labelled with a no-TTA CV unawares.

    The ensemble JSON's blend CV; else the runs' OOF under the same views and aggregation as the test
    predictions when `kpipe oof-tta` wrote them all; else the plain OOF (views not scored).
    """
    metric = cfg.competition.metric
    if plan.weights is not None:
        return (
            plan.cv,
            "nested OOF CV of the blend (weights fitted on the other folds, scored on each held-out fold)",
        )
    try:
        ref, members = load_members(plan.runs, include_tta=True)
    except KpipeError as e:
        console.print(f"[yellow]no CV for the sidecar: {e}", soft_wrap=True)
        return None, "none"
    labels = np.array([ref.classes.index(label) for label in ref.labels])
    have = {(m.run, m.view): m.probs for m in members}
    wanted = [[(r, v) for v in plan.views[r]] for r in plan.runs]
    if all(k in have for keys in wanted for k in keys):
        per_run = [tta.aggregate(np.stack([have[k] for k in keys]), plan.how) for keys in wanted]
        source = (
            "OOF with the same TTA views"
            if any(len(k) > 1 or k[0][1] != "identity" for k in wanted)
            else "OOF"
        )
    else:
        source = "OOF without TTA (run `kpipe oof-tta` to score the views)"
        cv_json = Path(plan.runs[0]) / "cv.json"
        if len(plan.runs) == 1 and cv_json.is_file():  # the run's own figure, as `kpipe train` printed it
            saved = json.loads(cv_json.read_text(encoding="utf-8"))
            if saved.get("metric") == metric:
                return float(saved["cv"]), source
        per_run = [have[(r, "identity")] for r in plan.runs]
    blended = blend(per_run, np.ones(len(per_run)), plan.how)
    return metrics.score(metric, labels, blended), source


# ------------------------------------------------------------------ kpipe oof-tta


def run_oof_tta(cfg: Config, runs: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Each fold's best.pt on its own validation images, once per TTA view -> runs/<exp>/oof_tta/<view>.csv."""
    device = dist.pick_device(cfg.train.device, cfg.train.cudnn_benchmark)
    classes = ingest.load_classes(cfg)
    views = tta.parse_views(cfg.infer.tta)
    table, _ = load_fold_table(cfg)
    files = ingest.load_train(cfg).df.set_index("id")["path"]  # every usable train image, by id
    results: dict[str, dict[str, float]] = {}
    for r in resolve_runs(cfg, runs):
        rm = predict.load_run(r, classes, device, cfg.infer.channels_last)
        own = run_assignment(Path(r), table, files, classes, paths.folds_csv(cfg))
        choice = choose_precision(cfg, rm, device, own)
        decode = choose_decode(cfg, rm, own["path"].tolist(), device)
        parts: list[tuple[pd.DataFrame, np.ndarray]] = []  # (rows, probs (V, n, K)) per fold
        for k, model in zip(rm.folds, rm.models, strict=True):
            rows = own[own["fold"] == k]
            if rows.empty:
                console.print(f"[yellow]{r}: fold {k} has no rows in its oof.csv; skipped")
                continue
            solo = predict.RunModels(r, rm.cfg, [k], [model], rm.data_cfg)
            probs, _, rate = _predict_run(
                cfg,
                solo,
                rows["path"].tolist(),
                views,
                len(classes),
                device,
                False,
                f"oof-tta {r} fold {k}",
                choice,
                decode.name,
            )
            console.print(f"{r} fold {k}: {len(rows)} images x {len(views)} views, {rate:.1f} images/s")
            parts.append((rows, probs[0]))
        if not parts:
            raise KpipeError(f"{r}: none of its folds {rm.folds} has rows in its oof.csv.")
        rows = pd.concat([p[0] for p in parts], ignore_index=True)
        per_view = np.concatenate([p[1] for p in parts], axis=1)  # (V, N, K)
        order = rows.sort_values(["fold", "id"], kind="stable").index.to_numpy()  # oof.csv's order
        rows, per_view = rows.loc[order].reset_index(drop=True), per_view[:, order]
        for v, view in enumerate(views):
            oof = pd.concat(
                [
                    rows[["id", "fold", "label"]],
                    pd.DataFrame(per_view[v], columns=[f"p_{c}" for c in classes]),
                ],
                axis=1,
            )
            write_csv(Path(r) / "oof_tta" / f"{view}.csv", oof)
        results[r] = _view_scores(cfg, rows["y"].to_numpy(), per_view, views)
        _print_views(r, cfg, results[r], len(rows))
    return results


def run_assignment(
    run_dir: Path, table: pd.DataFrame, files: pd.Series, classes: list[str], folds_csv: Path
) -> pd.DataFrame:
    """The rows a run's fold models never trained on, with the labels it trained with: its own oof.csv's
    (id, fold, label), and each id's image path from `files` (the competition's usable train images by id: an
    image the folds file has left out since, e.g. a relabel `drop`, is still scored where it was). Not the folds file as it is now:
    after `kpipe relabel --apply` and `kpipe folds` its folds and labels differ from the run's, and fold
    k's model would be scored on images it trained on (an optimistic, leaky "OOF")."""
    oof = read_oof(
        paths.RunDir(run_dir).oof, "oof-tta scores a run's fold models on their own validation rows."
    )
    if oof.folds is None:
        raise KpipeError(
            f"{run_dir}/oof.csv has no fold column. Re-train the run with this kpipe (`kpipe train`)."
        )
    missing = [i for i in oof.ids if i not in files.index]
    if missing:
        raise KpipeError(
            f"{run_dir}/oof.csv: {len(missing)} ids have no usable train image now ({preview(missing)}). "
            "Re-train the run on the current data."
        )
    unknown = sorted(set(oof.labels) - set(classes))
    if unknown:
        raise KpipeError(f"{run_dir}/oof.csv: labels {preview(unknown)} are not in the class list.")
    own = pd.DataFrame({"id": oof.ids, "fold": oof.folds.astype(int), "label": oof.labels})
    now = table.set_index("id").reindex(own["id"])[["fold", "label"]].reset_index(drop=True)
    changed = int(((now["fold"] != own["fold"]) | (now["label"] != own["label"])).sum())
    if changed:
        console.print(
            f"[yellow]{safe(run_dir)}: {changed} rows have another fold or label in {safe(folds_csv)} (or are left out) "
            "than when it trained; they are scored with the run's own (its oof.csv).",
            soft_wrap=True,
        )
    index = {c: i for i, c in enumerate(classes)}
    return own.assign(path=own["id"].map(files).to_numpy(), y=own["label"].map(index).to_numpy())


def _view_scores(cfg: Config, labels: np.ndarray, per_view: np.ndarray, views: list[str]) -> dict[str, float]:
    metric = cfg.competition.metric
    scores = {v: metrics.score(metric, labels, per_view[i]) for i, v in enumerate(views)}
    scores["mean"] = metrics.score(metric, labels, tta.aggregate(per_view.astype(np.float64), cfg.infer.agg))
    return scores


def _print_views(run: str, cfg: Config, scores: dict[str, float], n: int) -> None:
    metric = cfg.competition.metric
    table = Table(title=f"{run}: OOF {metric} per TTA view ({n} rows)")
    table.add_column("view")
    table.add_column(metric, justify="right")
    for view, s in scores.items():
        if view != "mean":
            table.add_row(view, f"{s:.5f}")
    table.add_section()
    table.add_row(f"{cfg.infer.agg} of {len(scores) - 1} views", f"{scores['mean']:.5f}", style="bold")
    console.print(table)
    console.print(
        f"wrote {Path(run) / 'oof_tta'}/<view>.csv; blend them with `kpipe ensemble` (TTA views included)"
    )
