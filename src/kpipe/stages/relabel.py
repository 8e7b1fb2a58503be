"""`kpipe relabel`: find likely misfiled training images from out-of-fold predictions, review, apply.

Confident learning (cleanlab's `find_label_issues`, default `prune_by_noise_rate`) over a run's
oof.csv flags images whose given label the model, never having trained on them, disagrees with
more than each class's noise rate explains. Each suspect gets
  score     = 1 - p(given label)  (cleanlab's self-confidence label quality, flipped): the OOF
              probability mass on other classes, in [0, 1]; 1 means "surely not its given class";
  suggested = the most probable class other than the given one.
They go to <work_dir>/relabels.csv (id, given, suggested, score, decision, source), best first,
and to <work_dir>/review.html (each suspect beside confidently-correct examples of both classes).
A person decides in the CSV (decision: accept = move to `suggested`, drop = leave the image out,
keep = label is right, empty = undecided) or with `--accept-above SCORE`, and may add rows of
their own (source=manual). Re-running keeps every decision and manual row. `--apply` writes
<work_dir>/labels_clean.csv (id, label, action in {relabel, drop}), which `kpipe folds` reads;
the raw competition files are never touched. `--quick` first trains a small from-scratch CV
model (resnet10t, <= 4 epochs, runs/<exp>_quick) when no run exists yet.

`--from runs/a runs/b` (every TTA view each has, equal weights) or `--from runs/ensembles/<exp>.json` (its
weights) ranks the suspects on the blended OOF instead of one run's: several models' evidence.

Usage: ``kpipe relabel -c configs/exp/demo.yaml --comp demo [--quick] [--from RUN...] [--filter F] [--accept-above 0.9] [--apply]``
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from rich.table import Table

from kpipe import paths
from kpipe.config import Config, load_run_config, validate
from kpipe.console import console, safe, warn
from kpipe.data.folds import apply_label_changes
from kpipe.data.ingest import Ingest, fingerprint, load_train
from kpipe.data.relabels import (
    COLUMNS,
    accept_above_threshold,
    build_clean_labels,
    locked,
    merge_relabels,
    read_relabels,
    write_relabels,
)
from kpipe.errors import KpipeError
from kpipe.eval.blend import blended_oof
from kpipe.eval.cleaning import FILTERS, find_suspects
from kpipe.eval.oof import read_oof
from kpipe.eval.review import decision_counts, fmt_score, write_review
from kpipe.io import read_csv_ids, write_csv, write_json
from kpipe.paths import RunDir

QUICK_MAX_EPOCHS = 4
QUICK_LR = 2e-3


def quick_config(cfg: Config) -> Config:
    """A small from-scratch CV model for OOF probabilities: resnet10t, <= 4 epochs, runs/<exp>_quick.

    At <= 64 px it keeps the size with a small stem (no early downsampling); larger or unset
    sizes train at 128 px at most. Augmentation, normalisation, batch size and device are kept.
    """
    d = cfg.to_dict()
    size = cfg.data.img_size
    small = size is not None and size <= 64
    d["name"] = f"{cfg.name}_quick"
    d["model"] = {"name": "resnet10t", "pretrained": False, "small_stem": small}
    d["data"]["img_size"] = size if small else min(size or 128, 128)
    d["train"].update(
        epochs=min(cfg.train.epochs, QUICK_MAX_EPOCHS),
        folds=None,
        optimizer="adamw",
        lr=QUICK_LR,
        scheduler="cosine",
        warmup_epochs=0,
        label_smoothing=0.0,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        ema=False,
        accum_steps=1,
        early_stop_patience=None,
        compile=False,
    )
    return validate(d)


# ------------------------------------------------------------------ I/O shell


def check_quick_run(cfg: Config, qcfg: Config) -> None:
    """Refuse to continue a quick run that was trained on other labels than the folds file has now."""
    oof, folds_csv = paths.run_dir(qcfg).oof, paths.folds_csv(cfg)
    if not (oof.is_file() and folds_csv.is_file()):
        return
    then = read_csv_ids(oof)[["id", "label"]].sort_values("id").reset_index(drop=True)
    now = read_csv_ids(folds_csv)[["id", "label"]].sort_values("id").reset_index(drop=True)
    if not then.equals(now):
        where = paths.run_dir(qcfg).root
        raise KpipeError(
            f"{where} was trained on other labels than {folds_csv} (folds re-made since?). "
            f"Delete {where} and re-run, pass name=<new> for a new quick run, or leave out "
            "--quick to review/apply relabels.csv as it is."
        )


def run(
    cfg: Config,
    run_dir: str | Path | None = None,
    accept_above: float | None = None,
    apply: bool = False,
    sources: list[str] | None = None,
    filter_by: str | None = None,
) -> pd.DataFrame:
    """Suggest (from OOF, when there is a run), merge with the decisions made, write the page, maybe apply.
    `sources` (--from): several runs, or an ensemble JSON, whose blended OOF ranks the suspects instead.
    `filter_by` (--filter): which of cleanlab's filters picks the suspects (cleaning.FILTERS; default the first)."""
    csv_path = paths.relabels_csv(cfg)
    with locked(csv_path):  # a click on the review page meanwhile is not lost
        existing = read_relabels(csv_path)
        source = RunDir(Path(run_dir)) if run_dir is not None else paths.run_dir(cfg)
        ing = load_train(cfg)
        oof = None
        if sources or source.oof.is_file() or existing is None:
            if sources:
                oof, where = blended_oof(sources, cfg.infer.agg), "the blend of " + ", ".join(sources)
            else:
                oof = read_oof(
                    source.oof,
                    "Train first (`kpipe train`), point --run at a run folder, "
                    "or use --quick to train a small model for this.",
                )
                where = str(source.root)
            _warn_smoothed(sources or [str(source.root)])
            fresh = find_suspects(oof.ids, oof.labels, oof.probs, oof.classes, filter_by or FILTERS[0])
            table = merge_relabels(existing, fresh)
            console.print(
                f"{len(fresh)} suspects among {len(oof.ids)} out-of-fold predictions of {safe(where)}"
            )
        else:  # a person's own table (e.g. manual rows only) still reviews and applies
            table = existing
            console.print(
                f"[yellow]no {safe(source.oof)}: using {safe(csv_path)} as it is, no new suggestions"
            )
        if accept_above is not None:
            before = int((table["decision"] == "accept").sum())
            table = accept_above_threshold(table, accept_above)
            console.print(
                f"--accept-above {accept_above}: {int((table['decision'] == 'accept').sum()) - before} "
                "more rows accepted"
            )
        write_relabels(csv_path, table)
    write_review(paths.review_html(cfg), table, ing.df, oof, csv_path.name)
    _print_top(table, csv_path, paths.review_html(cfg))
    if apply:
        _apply(cfg, table, ing, csv_path)
    return table


def _warn_smoothed(sources: list[str]) -> None:
    """Label smoothing caps a model's confidence, and cleanlab's count of wrong labels reads confidence: on the
    demo a run trained with train.label_smoothing=0.1 gave 60 suspects (recall 0.750) where one without gave
    76 (recall 0.938). Say so when a run the suspects come from was trained that way."""
    runs: list[str] = []
    for src in sources:  # a run folder, or an ensemble JSON naming its member runs
        if src.endswith(".json") and Path(src).is_file():
            members = json.loads(Path(src).read_text(encoding="utf-8")).get("members", [])
            runs += [str(m["run"]) for m in members if isinstance(m, dict) and "run" in m]
        else:
            runs.append(src)
    for src in dict.fromkeys(runs):
        if not (Path(src) / "config.yaml").is_file():
            continue  # blended_oof / read_oof say what is wrong with a folder that is no run
        smoothing = load_run_config(src).train.label_smoothing
        if smoothing > 0:
            warn(
                f"{safe(src)} trained with train.label_smoothing={smoothing}: its OOF probabilities are "
                "capped, so confident learning flags too few images (on the demo 60 instead of 76, recall "
                "0.750 instead of 0.938). For cleaning, train the run with train.label_smoothing=0."
            )


def _print_top(table: pd.DataFrame, csv_path: Path, page: Path, n: int = 10) -> None:
    t = Table(title=f"top suspects ({len(table)} rows in {csv_path})")
    for col in COLUMNS:
        t.add_column(col, justify="right" if col == "score" else "left")
    for _, r in table.head(n).iterrows():
        t.add_row(*[fmt_score(r[c]) if c == "score" else safe(r[c]) for c in COLUMNS])
    console.print(t)
    console.print(
        f"decisions: {decision_counts(table)}. Review page: {page}\nDecide in the decision column of {csv_path} "
        "(accept / drop / keep) or with --accept-above SCORE; then run again with --apply."
    )


def _apply(cfg: Config, table: pd.DataFrame, ing: Ingest, csv_path: Path) -> None:
    clean = build_clean_labels(
        table, dict(zip(ing.df["id"], ing.df["label"], strict=True)), ing.classes, str(csv_path)
    )
    out = paths.clean_labels_csv(cfg)
    write_csv(out, clean)
    write_json(paths.clean_labels_source(cfg), {"train_fingerprint": fingerprint(cfg)})
    _, summary = apply_label_changes(ing.df[["id", "label"]], clean)
    t = Table(title=f"label changes in {out}")
    for col in ("class", "relabelled from", "relabelled to", "dropped"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for cls in [c for c in ing.classes if c in summary.index]:
        r = summary.loc[cls]
        t.add_row(safe(cls), str(r["relabelled_from"]), str(r["relabelled_to"]), str(r["dropped"]))
    console.print(t)
    comp = cfg.competition.name
    console.print(
        f"wrote {out}: {int((clean['action'] == 'relabel').sum())} relabelled, "
        f"{int((clean['action'] == 'drop').sum())} dropped; nothing under {paths.data_dir(cfg)} changed.\n"
        f"next: kpipe folds --comp {comp}   then   kpipe train -c <exp.yaml> --comp {comp} name={cfg.name}_clean"
    )
