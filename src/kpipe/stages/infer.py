"""`kpipe infer`: fold models x TTA views x runs -> probabilities and a checked submission.

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
faster); nn.forms makes those choices. `kpipe oof-tta` is stages/oof_tta.py.

Writes predictions/<name>/{probs.csv, ids.csv, classes.json, members.json, members/*.npy},
submissions/<name>.csv (validated before it is written) and submissions/<name>.json (what made it).
The per-member .npy files are float32, float16 or not written (infer.save_views: 100k images x 1,000
classes x 5 folds x 8 views is 16 GB in float32); free disk space is checked before anything is written.
Usage: ``kpipe infer -c configs/exp/b0.yaml --comp demo infer.tta=identity,hflip``
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console, print_problems, safe
from kpipe.data import ingest
from kpipe.data.folds import load_fold_table
from kpipe.errors import KpipeError, preview
from kpipe.eval import metrics
from kpipe.eval.blend import RANK_MEAN, blend, check_finite
from kpipe.eval.oof import load_members
from kpipe.io import atomic_path, check_free_space, read_csv_ids, write_csv, write_json
from kpipe.kaggle import ledger, submission
from kpipe.kaggle.package import PackageSpec, read_check, read_spec
from kpipe.nn import dist, forms, precision, predict, runtime, tta
from kpipe.nn.plan import Plan, class_prior, make_plan, resolve_runs

__all__ = ["Plan", "class_prior", "make_plan", "package_plan", "resolve_runs", "run"]


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
    precisions: dict[str, dict[str, Any]] = {}
    runtimes: dict[str, dict[str, Any]] = {}
    decodes: dict[str, dict[str, Any]] = {}
    by_size: dict[int, predict.DecodeChoice] = {}  # runs at one image size share the decoder timing
    table = _fold_table(cfg)
    for r in plan.runs:
        rm = predict.load_run(r, classes, device, cfg.infer.channels_last)
        views = plan.views[r]
        rm, choice, rt = forms.choose_forms(cfg, rm, device, table, len(tta.parse_views(views)))
        precisions[r], runtimes[r] = choice.to_json(), rt.to_json()
        size = int(rm.data_cfg["img_size"])
        decode = by_size[size] = by_size.get(size) or forms.choose_decode(cfg, rm, files, device)
        decodes[r] = decode.to_json()
        probs, good, rate = forms.predict_run(
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
        "precision": precisions,
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
