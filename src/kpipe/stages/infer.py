"""`kpipe infer` and `kpipe oof-tta`: fold models x TTA views x runs -> probabilities and a checked submission.

Each run (a folder written by `kpipe train`) predicts with its own model and preprocessing (its
config.yaml and the data_config in its checkpoints). The test images are decoded once per run;
every batch goes through all of the run's fold models, each with all TTA views in one forward
(tta.predict_batched). Probabilities are averaged over views and folds, then runs (infer.agg), or
blended with the weights `kpipe ensemble` fitted (infer.ensemble_weights: members are (run, view),
each the fold average). Missing or undecodable test images still get a row: the class prior of
the training labels, with a warning. `run_oof_tta` predicts each fold's own validation images with
every view (runs/<exp>/oof_tta/<view>.csv), so `kpipe ensemble` can weigh views, and shows each
view's CV.

Writes predictions/<name>/{probs.csv, ids.csv, classes.json, members.json, members/*.npy},
submissions/<name>.csv (validated before it is written) and submissions/<name>.json (what made it).
Usage: ``kpipe infer -c configs/exp/b0.yaml --comp demo infer.tta=identity,hflip``
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console, plain, safe
from kpipe.data import ingest, transforms
from kpipe.data.folds import load_fold_table
from kpipe.errors import KpipeError, preview
from kpipe.eval import metrics
from kpipe.eval.blend import RANK_MEAN, blend, check_finite
from kpipe.eval.oof import load_members
from kpipe.io import atomic_path, read_csv_ids, write_csv, write_json
from kpipe.kaggle import ledger, submission
from kpipe.nn import dist, predict, tta
from kpipe.nn.engine import amp_settings


@dataclass(frozen=True)
class MemberPred:
    run: str
    fold: int
    view: str
    probs: np.ndarray  # (N, K) float32, test order


@dataclass(frozen=True)
class Plan:
    runs: list[str]
    views: dict[str, list[str]]  # run -> views to predict
    weights: dict[tuple[str, str], float] | None  # (run, view) -> weight, from `kpipe ensemble`
    how: str
    cv: float | None  # the ensemble's OOF CV, when weights are used


# ------------------------------------------------------------------ pure helpers


def class_prior(labels: list[str], classes: list[str]) -> np.ndarray:
    """Class frequencies of the training labels, in `classes` order: the guess for an unreadable image."""
    counts = pd.Series(labels, dtype=object).value_counts().reindex(classes, fill_value=0).to_numpy(np.float64)
    if counts.sum() == 0:
        return np.full(len(classes), 1.0 / len(classes))
    return counts / counts.sum()


def blend_members(members: list[MemberPred], how: str, weights: dict[tuple[str, str], float] | None) -> np.ndarray:
    """Final (N, K) probabilities: mean over views and folds within each run, then over runs;
    or, with weights, each (run, view) averaged over folds and blended with its weight."""
    if weights is None:
        runs = list(dict.fromkeys(m.run for m in members))
        per_run = [tta.aggregate(np.stack([m.probs for m in members if m.run == r]).astype(np.float64), how)
                   for r in runs]
        return per_run[0] if len(per_run) == 1 else tta.aggregate(np.stack(per_run), how)
    keys = list(weights)
    within = "mean" if how == RANK_MEAN else how  # a rank blend ranks each member's fold-mean probabilities
    per_key = [tta.aggregate(np.stack([m.probs for m in members if (m.run, m.view) == k]).astype(np.float64), within)
               for k in keys]
    return blend(per_key, np.array([weights[k] for k in keys]), how)


def resolve_runs(cfg: Config, runs: list[str] | None) -> list[str]:
    return [str(r) for r in (runs or cfg.infer.runs or [paths.run_dir(cfg).root])]


def make_plan(cfg: Config, runs: list[str] | None, classes: list[str]) -> Plan:
    """Which runs and views to predict and how to combine them: infer.tta + infer.agg, or the ensemble JSON."""
    if cfg.infer.ensemble_weights is None:
        names = resolve_runs(cfg, runs)
        views = tta.parse_views(cfg.infer.tta)
        return Plan(names, {r: views for r in names}, None, cfg.infer.agg, None)
    path = Path(cfg.infer.ensemble_weights)
    if not path.is_file():
        raise KpipeError(f"infer.ensemble_weights: {path} not found. Write it with `kpipe ensemble` first.")
    rep = json.loads(path.read_text(encoding="utf-8"))
    if set(rep.get("classes", classes)) != set(classes):
        raise KpipeError(f"{path}: fitted on classes {preview(rep['classes'])}, not this competition's "
                         f"{preview(classes)}. Re-run `kpipe ensemble`.")
    given = runs or cfg.infer.runs
    in_json = {Path(m["run"]).resolve() for m in rep["members"]}
    if given and {Path(r).resolve() for r in given} != in_json:
        raise KpipeError(f"{path} blends runs {preview(sorted(str(p) for p in in_json))}, but infer was given "
                         f"{preview(list(given))}. Drop --runs / infer.runs, or re-run `kpipe ensemble` on these runs.")
    for m in rep["members"]:  # NaN > 0 is False: a NaN weight would silently drop its member
        if not math.isfinite(float(m["weight"])) or float(m["weight"]) < 0:
            raise KpipeError(f"{path}: member {m['run']} [{m['view']}] has weight {m['weight']}; weights must be "
                             "finite and >= 0. Re-run `kpipe ensemble` to fit them again.")
    weights = {(m["run"], m["view"]): float(m["weight"]) for m in rep["members"] if float(m["weight"]) > 0}
    if not weights:
        raise KpipeError(f"{path}: every member has weight 0.")
    names = list(dict.fromkeys(r for r, _ in weights))
    views = {r: tta.parse_views([v for rr, v in weights if rr == r]) for r in names}
    return Plan(names, views, weights, rep.get("how", cfg.infer.agg), rep.get("cv_blend"))


# ------------------------------------------------------------------ models and prediction












def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def _predict_run(cfg: Config, rm: predict.RunModels, files: list[str], views: list[str], n_classes: int,
                 device: torch.device, tolerant: bool, label: str) -> tuple[np.ndarray, np.ndarray, float]:
    """All fold models of a run on `files`; returns (probs (F, V, N, K), ok (N,), images/s)."""
    loader = predict.make_eval_loader(files, rm.data_cfg, cfg.infer.batch_size, cfg.data.num_workers, device, tolerant)
    amp_dtype, _ = amp_settings(device, rm.cfg.train)
    channels_last = device.type == "cuda" and rm.cfg.train.channels_last
    start = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task(label, total=len(files))
        prepare = transforms.Normalize(rm.data_cfg["mean"], rm.data_cfg["std"])
        probs, ok = predict.predict_models(rm.models, loader, views, n_classes, device, amp_dtype, channels_last, prepare,
                                   lambda n: progress.advance(task, n))
    return probs, ok, len(files) / max(time.perf_counter() - start, 1e-9)


# ------------------------------------------------------------------ kpipe infer


def run(cfg: Config, runs: list[str] | None = None) -> dict[str, Any]:
    """Predict the test set with every fold of every run and TTA view; write predictions and a validated submission."""
    device = dist.pick_device(cfg.train.device)
    classes = ingest.load_classes(cfg)
    plan = make_plan(cfg, runs, classes)
    test = ingest.load_test(cfg)
    files, ids = test["path"].tolist(), test["id"].tolist()
    ok = test["found"].to_numpy(bool).copy()
    members: list[MemberPred] = []
    folds: dict[str, list[int]] = {}
    for r in plan.runs:
        rm = predict.load_run(r, classes, device)
        views = plan.views[r]
        probs, good, rate = _predict_run(cfg, rm, files, views, len(classes), device, True, f"infer {r}")
        for f, k in enumerate(rm.folds):
            for j, v in enumerate(views):
                check_finite(probs[f, j], f"{r}/fold{k}/best.pt, TTA view {v}, on the test images")
        console.print(f"{r}: {len(files)} test images x {len(rm.folds)} folds x {len(views)} views "
                      f"at {rm.data_cfg['img_size']} px, {rate:.1f} images/s on {device}")
        ok &= good
        folds[r] = rm.folds
        members += [MemberPred(r, k, v, probs[f, j]) for f, k in enumerate(rm.folds) for j, v in enumerate(views)]
        del rm, probs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bad = ~ok
    prior = class_prior(read_csv_ids(paths.folds_csv(cfg))["label"].tolist(), classes) if bad.any() else None
    if prior is not None:
        for m in members:
            m.probs[bad] = prior
    final = blend_members(members, plan.how, plan.weights)
    _warn_unreadable(test, ok)
    name = cfg.infer.name or cfg.name
    out_dir = paths.predictions_dir(cfg, name)
    write_predictions(out_dir, ids, classes, final, members, test.loc[bad, ["id", "found", "reason"]])
    sub_path = paths.submission_csv(cfg, name)
    write_submission(cfg, final, ids, classes, sub_path)
    cv_value, cv_source = _cv(cfg, plan)
    sidecar = {"runs": plan.runs, "cv": cv_value, "cv_source": cv_source, "metric": cfg.competition.metric,
               "folds": folds,
               "tta": list(dict.fromkeys(v for r in plan.runs for v in plan.views[r])), "agg": plan.how,
               "weights": None if plan.weights is None else
               [{"run": r, "view": v, "weight": w} for (r, v), w in plan.weights.items()],
               "ensemble_weights": cfg.infer.ensemble_weights, "n_test": len(ids), "n_unreadable": int(bad.sum()),
               "predictions": str(out_dir),
               # `kpipe submit` refuses a sidecar whose sha256 is not its CSV's (a kill between the two writes)
               "sha256": ledger.sha256_file(sub_path)}
    write_json(paths.sidecar(sub_path), sidecar)
    cv = f"CV {sidecar['metric']} {cv_value:.4f}, {cv_source}" if cv_value is not None else "no CV"
    console.print(f"[bold green]wrote {sub_path}[/] ({len(ids)} rows, {cv}); probabilities in {out_dir}")
    return {**sidecar, "submission": str(sub_path), "unreadable": test.loc[bad, "id"].tolist()}


def _warn_unreadable(test: pd.DataFrame, ok: np.ndarray) -> None:
    bad = test.loc[~ok]
    if bad.empty:
        return
    outside = bad.loc[bad["reason"] == ingest.OUTSIDE, "id"].tolist()
    missing = int((~bad["found"]).sum()) - len(outside)
    refused = f", {len(outside)} refused: id outside the test folder" if outside else ""
    console.print(f"[yellow]warning: {len(bad)} test images could not be read ({missing} missing, "
                  f"{len(bad) - missing - len(outside)} not decodable{refused}):[/] {safe(preview(bad['id'].tolist()))}. "
                  "They get the class prior of the training labels; see unreadable.csv beside probs.csv.", soft_wrap=True)


def write_predictions(out_dir: Path, ids: list[str], classes: list[str], final: np.ndarray,
                      members: list[MemberPred], unreadable: pd.DataFrame) -> None:
    """probs.csv (the blend), ids.csv, classes.json, and one (N, K) float32 .npy per (run, fold, view)."""
    probs = pd.DataFrame(final, columns=[f"p_{c}" for c in classes])
    write_csv(out_dir / "probs.csv", pd.concat([pd.DataFrame({"id": ids}), probs], axis=1))
    write_csv(out_dir / "ids.csv", pd.DataFrame({"id": ids}))
    write_json(out_dir / "classes.json", classes)
    runs = list(dict.fromkeys(m.run for m in members))
    short = [Path(r).name for r in runs]
    # Two runs with one folder name (runs/a/x, other/x) would overwrite each other's files.
    tag = dict(zip(runs, short if len(set(short)) == len(short) else [f"{i}-{s}" for i, s in enumerate(short)],
                   strict=True))
    index = []
    for m in members:
        rel = f"members/{tag[m.run]}_fold{m.fold}_{m.view}.npy"
        with atomic_path(out_dir / rel) as tmp, open(tmp, "wb") as fh:
            np.save(fh, m.probs.astype(np.float32))
        index.append({"run": m.run, "fold": m.fold, "view": m.view, "file": rel})
    write_json(out_dir / "members.json", index)
    reasons = np.where(unreadable["found"].to_numpy(bool), "not decodable", unreadable["reason"].astype(str))
    write_csv(out_dir / "unreadable.csv", pd.DataFrame({"id": unreadable["id"].tolist(), "reason": reasons}))


def write_submission(cfg: Config, probs: np.ndarray, ids: list[str], classes: list[str], path: Path) -> pd.DataFrame:
    """The submission in sample_submission's shape; refused (KpipeError) when validation finds an error."""
    c = cfg.competition
    sample = ingest.read_sample_submission(cfg)
    sub = submission.make_submission(probs, ids, classes, sample, c)
    problems = submission.validate_submission(sub, sample, classes, c.sub_id_col, c.submission_format)
    for p in problems:
        if p.severity != "error":
            console.print(plain(p.render()), style="yellow", markup=False, highlight=False)
    errors = [p.render() for p in problems if p.severity == "error"]
    if errors:
        raise KpipeError(f"refusing to write {path}: it would not match sample_submission:\n  " + "\n  ".join(errors))
    write_csv(path, sub)
    return sub


def _cv(cfg: Config, plan: Plan) -> tuple[float | None, str]:
    """(CV, what it measures) for the sidecar: never a TTA submission labelled with a no-TTA CV unawares.

    The ensemble JSON's blend CV; else the runs' OOF under the same views and aggregation as the test
    predictions when `kpipe oof-tta` wrote them all; else the plain OOF (views not scored).
    """
    metric = cfg.competition.metric
    if plan.weights is not None:
        return plan.cv, "nested OOF CV of the blend (weights fitted on the other folds, scored on each held-out fold)"
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
        source = "OOF with the same TTA views" if any(len(k) > 1 or k[0][1] != "identity" for k in wanted) else "OOF"
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
    device = dist.pick_device(cfg.train.device)
    classes = ingest.load_classes(cfg)
    views = tta.parse_views(cfg.infer.tta)
    table, _ = load_fold_table(cfg)
    results: dict[str, dict[str, float]] = {}
    for r in resolve_runs(cfg, runs):
        rm = predict.load_run(r, classes, device)
        parts: list[tuple[pd.DataFrame, np.ndarray]] = []  # (rows, probs (V, n, K)) per fold
        for k, model in zip(rm.folds, rm.models, strict=True):
            rows = table[table["fold"] == k]
            if rows.empty:
                console.print(f"[yellow]{r}: fold {k} has no rows in {paths.folds_csv(cfg)}; skipped")
                continue
            solo = predict.RunModels(r, rm.cfg, [k], [model], rm.data_cfg)
            probs, _, rate = _predict_run(cfg, solo, rows["path"].tolist(), views, len(classes), device, False,
                                          f"oof-tta {r} fold {k}")
            console.print(f"{r} fold {k}: {len(rows)} images x {len(views)} views, {rate:.1f} images/s")
            parts.append((rows, probs[0]))
        if not parts:
            raise KpipeError(f"{r}: none of its folds {rm.folds} has rows in {paths.folds_csv(cfg)}.")
        rows = pd.concat([p[0] for p in parts], ignore_index=True)
        per_view = np.concatenate([p[1] for p in parts], axis=1)  # (V, N, K)
        _check_against_oof(Path(r), rows)
        order = rows.sort_values(["fold", "id"], kind="stable").index.to_numpy()  # oof.csv's order
        rows, per_view = rows.loc[order].reset_index(drop=True), per_view[:, order]
        for v, view in enumerate(views):
            oof = pd.concat([rows[["id", "fold", "label"]],
                             pd.DataFrame(per_view[v], columns=[f"p_{c}" for c in classes])], axis=1)
            write_csv(Path(r) / "oof_tta" / f"{view}.csv", oof)
        results[r] = _view_scores(cfg, rows["y"].to_numpy(), per_view, views)
        _print_views(r, cfg, results[r], len(rows))
    return results


def _check_against_oof(run_dir: Path, rows: pd.DataFrame) -> None:
    oof = run_dir / "oof.csv"
    if oof.is_file() and set(read_csv_ids(oof, usecols=["id"])["id"]) != set(rows["id"]):
        console.print(f"[yellow]warning: {run_dir}/oof.csv covers other ids than the folds file now does: the folds "
                      "changed since training, so `kpipe ensemble` will refuse to mix them. Re-train the run.",
                      soft_wrap=True)


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
    console.print(f"wrote {Path(run) / 'oof_tta'}/<view>.csv; blend them with `kpipe ensemble` (TTA views included)")
