"""`kpipe oof-tta`: each fold model on its own validation images, once per TTA view -> runs/<exp>/oof_tta/<view>.csv.

So `kpipe ensemble` can weigh TTA views on OOF, and each view's CV is shown. Which rows are a fold's, and their
labels, come from the run's own oof.csv (`run_assignment`), not the folds file as it is now: after `kpipe relabel
--apply` and `kpipe folds` those differ, and fold k's model would be scored on images it trained on. Predicts in
the form `kpipe infer` would (nn.forms: infer.runtime, infer.precision, infer.compile), since these files stand
in for oof.csv when `kpipe ensemble` weighs members.
Usage: ``kpipe oof-tta -c configs/exp/b0.yaml --comp demo infer.tta=identity,hflip``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console, safe
from kpipe.data import ingest
from kpipe.data.folds import load_fold_table
from kpipe.errors import KpipeError, preview
from kpipe.eval import metrics
from kpipe.eval.oof import read_oof
from kpipe.io import write_csv
from kpipe.nn import dist, forms, predict, tta
from kpipe.nn.plan import resolve_runs


def run(cfg: Config, runs: list[str] | None = None) -> dict[str, dict[str, float]]:
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
        rm, choice, _ = forms.choose_forms(cfg, rm, device, own, len(views))  # the form infer would use
        decode = forms.choose_decode(cfg, rm, own["path"].tolist(), device)
        parts: list[tuple[pd.DataFrame, np.ndarray]] = []  # (rows, probs (V, n, K)) per fold
        for k, model in zip(rm.folds, rm.models, strict=True):
            rows = own[own["fold"] == k]
            if rows.empty:
                console.print(f"[yellow]{r}: fold {k} has no rows in its oof.csv; skipped")
                continue
            solo = predict.RunModels(r, rm.cfg, [k], [model], rm.data_cfg)
            probs, _, rate = forms.predict_run(
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
