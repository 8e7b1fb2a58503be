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

Usage: ``kpipe relabel -c configs/exp/demo.yaml --comp demo [--quick] [--accept-above 0.9] [--apply]``
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from kpipe.config import Config, validate
from kpipe.data.ingest import Ingest, load_train
from kpipe.errors import KpipeError, preview
from kpipe.io import read_csv_ids, write_csv
from kpipe.eval.review import decision_counts, fmt_score, oof_arrays, write_review

console = Console()

COLUMNS = ["id", "given", "suggested", "score", "decision", "source"]
DECISIONS = ("", "accept", "drop", "keep")
SOURCES = ("cleanlab", "manual")
QUICK_MAX_EPOCHS = 4
QUICK_LR = 2e-3


# ------------------------------------------------------------------ pure core: suspects


def find_suspects(ids: list[str], labels: list[str], probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Confident-learning suspects: DataFrame[id, given, suggested, score], score descending."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise KpipeError(f"oof.csv: labels {preview(unknown)} have no p_<class> column.")
    if len(set(ids)) != len(ids):
        raise KpipeError("oof.csv: ids repeat; expected one out-of-fold row per training image.")
    from cleanlab.filter import find_label_issues  # imported here: a slow import only this stage needs
    from cleanlab.rank import get_label_quality_scores

    y = np.array([index[label] for label in labels], dtype=int)
    probs = np.clip(probs, 0.0, None)
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        issues = find_label_issues(y, probs, n_jobs=1)  # n_jobs=1: its process pool costs more than it saves here
    few = sorted({int(m.group(1)) for w in caught if (m := re.search(r"class: (\d+), it has too few", str(w.message)))})
    if few:
        console.print(f"[yellow]cleanlab: classes {preview([classes[i] for i in few])} have too few images "
                      "for it to flag every issue in them.")
    score = np.round(1.0 - get_label_quality_scores(y, probs, method="self_confidence"), 4)
    others = probs.copy()
    others[np.arange(len(y)), y] = -1.0  # the best class that is not the given one
    suggested = others.argmax(axis=1)
    rows = np.flatnonzero(issues)
    out = pd.DataFrame({"id": np.asarray(ids, dtype=object)[rows], "given": np.asarray(labels, dtype=object)[rows],
                        "suggested": [classes[k] for k in suggested[rows]], "score": score[rows]})
    return sort_relabels(out)


def sort_relabels(df: pd.DataFrame) -> pd.DataFrame:
    """Best first: score descending (manual rows without a score on top), then id."""
    s = pd.to_numeric(df["score"], errors="coerce")
    order = df.assign(_s=s).sort_values(["_s", "id"], ascending=[False, True], na_position="first", kind="mergesort")
    return order.drop(columns="_s").reset_index(drop=True)


def normalise_relabels(raw: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check a relabels.csv a person may have edited; tidy decision/source; parse score (NaN if blank)."""
    missing = [c for c in ("id", "given", "suggested", "decision") if c not in raw.columns]
    if missing:
        raise KpipeError(f"{where}: no column {', '.join(missing)}; expected {', '.join(COLUMNS)}.")
    extra = [c for c in raw.columns if c not in COLUMNS]  # a person's own columns (notes...) are kept
    df = raw.reindex(columns=[*COLUMNS, *extra], fill_value="").astype(str)
    tidy = ["given", "suggested", "score", "decision", "source"]  # not the id: ids stay byte for byte
    df[tidy] = df[tidy].apply(lambda c: c.str.strip())
    df["decision"] = df["decision"].str.lower()
    df["source"] = df["source"].str.lower().replace("", "manual")  # a hand-added row without a source is manual
    for i, row in df.iterrows():
        line = f"{where} line {int(i) + 2} (id '{row['id']}')"
        if row["decision"] not in DECISIONS:
            raise KpipeError(f"{line}: decision '{row['decision']}' is not one of accept, drop, keep or empty.")
        if row["source"] not in SOURCES:
            raise KpipeError(f"{line}: source '{row['source']}' is not cleanlab or manual.")
        if not row["id"]:
            raise KpipeError(f"{line}: empty id.")
    score = pd.to_numeric(df["score"].replace("", np.nan), errors="coerce")
    bad = score.isna() & (df["score"] != "")
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise KpipeError(f"{where} line {i + 2}: score '{df['score'].iloc[i]}' is not a number (leave it empty).")
    return df.assign(score=score)


def merge_relabels(existing: pd.DataFrame | None, fresh: pd.DataFrame) -> pd.DataFrame:
    """Fresh suggestions merged into a table a person may have edited.

    Kept as they are: every manual row and every row with a decision (its score refreshed if the
    id is still a suspect). Undecided cleanlab rows are replaced by the fresh suggestions, so
    an image the new model no longer doubts leaves the list.
    """
    new = fresh.assign(decision="", source="cleanlab").reindex(columns=COLUMNS)
    if existing is None or existing.empty:
        return sort_relabels(new)
    kept = existing[(existing["decision"] != "") | (existing["source"] == "manual")].copy()
    now = kept["id"].map(fresh.set_index("id")["score"]).astype(float)
    kept["score"] = now.where((kept["source"] == "cleanlab") & now.notna(), kept["score"]).astype(float)
    new = new[~new["id"].isin(set(kept["id"]))]
    return sort_relabels(pd.concat([kept, new], ignore_index=True))


def accept_above_threshold(df: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """decision=accept for every undecided row with score >= threshold; decided rows untouched."""
    if not 0.0 <= threshold <= 1.0:
        raise KpipeError(f"--accept-above {threshold}: scores lie in [0, 1]; pick a threshold there (e.g. 0.9).")
    hit = (df["decision"] == "") & (pd.to_numeric(df["score"], errors="coerce") >= threshold)
    return df.assign(decision=df["decision"].where(~hit, "accept"))


def build_clean_labels(df: pd.DataFrame, train_labels: dict[str, str], classes: list[str],
                       where: str = "relabels.csv") -> pd.DataFrame:
    """labels_clean rows (id, label, action) from accepted and dropped rows, sorted by id.

    Every row that takes effect, and every manual row, must name a training id; an accepted row
    must name a known class. One id with two different effective decisions is refused.
    """
    known = set(classes)
    out: dict[str, tuple[str, str, int]] = {}
    for i, row in df.reset_index(drop=True).iterrows():
        line = f"{where} line {int(i) + 2} (id '{row['id']}', source {row['source']})"
        effective = row["decision"] in ("accept", "drop")
        if not (effective or row["source"] == "manual"):
            continue
        if row["id"] not in train_labels:
            raise KpipeError(f"{line}: '{row['id']}' is not a usable training image id. Fix the id or delete the row.")
        if row["decision"] == "accept" and row["suggested"] not in known:
            raise KpipeError(f"{line}: suggested class '{row['suggested']}' is not a class "
                             f"({preview(classes)}). Fix it, or use decision=drop.")
        if not effective:
            continue
        change = ("relabel", row["suggested"]) if row["decision"] == "accept" else ("drop", train_labels[row["id"]])
        if row["id"] in out and out[row["id"]][:2] != change:
            raise KpipeError(f"{line}: contradicts line {out[row['id']][2]} for the same id "
                             f"({out[row['id']][0]} vs {change[0]} {change[1]}). Keep one of them.")
        out.setdefault(row["id"], (*change, int(i) + 2))
    rows = [(k, v[1], v[0]) for k, v in sorted(out.items())]
    return pd.DataFrame(rows, columns=["id", "label", "action"])


def relabel_precision_recall(relabels_df: pd.DataFrame, truth_df: pd.DataFrame) -> dict[str, Any]:
    """How well the acted-on rows match the truly misfiled images (the demo's truth file).

    Acted on = decision accept or drop (both take the wrong label out of training).
    precision = acted rows whose given label really was wrong / acted rows;
    recall = misfiled train ids acted on / misfiled train ids;
    fix_accuracy = accepted misfiled rows whose suggested class is the true one / accepted misfiled rows.
    A ratio with a zero denominator is NaN.
    """
    t = truth_df[truth_df["split"].astype(str) == "train"]
    true = dict(zip(t["id"].astype(str), t["true_label"].astype(str), strict=True))
    misfiled = {i for i, g in zip(t["id"].astype(str), t["given_label"].astype(str), strict=True) if g != true[i]}
    d = relabels_df.astype({"id": str, "decision": str, "suggested": str})
    acted = d[d["decision"].isin(["accept", "drop"])].drop_duplicates("id")
    hits = acted["id"].isin(misfiled)
    acc_hits = acted[hits & (acted["decision"] == "accept")]
    fixed = int((acc_hits["suggested"] == acc_hits["id"].map(true)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {"precision": ratio(int(hits.sum()), len(acted)), "recall": ratio(int(hits.sum()), len(misfiled)),
            "fix_accuracy": ratio(fixed, len(acc_hits)), "n_accepted": int((acted["decision"] == "accept").sum()),
            "n_dropped": int((acted["decision"] == "drop").sum()), "n_hits": int(hits.sum()),
            "n_misfiled": len(misfiled)}


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
    d["train"].update(epochs=min(cfg.train.epochs, QUICK_MAX_EPOCHS), folds=None, optimizer="adamw", lr=QUICK_LR,
                      scheduler="cosine", warmup_epochs=0, label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0,
                      ema=False, accum_steps=1, early_stop_patience=None, compile=False)
    return validate(d)


# ------------------------------------------------------------------ I/O shell


def relabels_path(cfg: Config) -> Path:
    return cfg.work_dir / "relabels.csv"


def review_path(cfg: Config) -> Path:
    return cfg.work_dir / "review.html"


def read_relabels(path: Path) -> pd.DataFrame | None:
    return normalise_relabels(read_csv_ids(path), str(path)) if path.is_file() else None


def write_relabels(path: Path, df: pd.DataFrame) -> None:
    """Scores with 4 decimals, blanks for none: the same table always gives the same bytes."""
    s = pd.to_numeric(df["score"], errors="coerce")
    columns = [*COLUMNS, *[c for c in df.columns if c not in COLUMNS]]
    write_csv(path, df.assign(score=[f"{v:.4f}" if pd.notna(v) else "" for v in s])[columns].fillna(""))


def read_oof(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / "oof.csv"
    if not path.is_file():
        raise KpipeError(f"{path}: no out-of-fold predictions. Train first (`kpipe train`), point --run at a run "
                         "folder, or use --quick to train a small model for this.")
    return read_csv_ids(path)


def _quick_run(cfg: Config) -> Path:
    """Train (or finish) the quick run and return its folder; refuse one trained on other labels."""
    from kpipe.stages import train  # torch: only loaded when a model is trained

    qcfg = quick_config(cfg)
    oof = qcfg.run_dir / "oof.csv"
    if oof.is_file() and cfg.folds_csv.is_file():
        then = read_csv_ids(oof)[["id", "label"]].sort_values("id").reset_index(drop=True)
        now = read_csv_ids(cfg.folds_csv)[["id", "label"]].sort_values("id").reset_index(drop=True)
        if not then.equals(now):
            raise KpipeError(f"{qcfg.run_dir} was trained on other labels than {cfg.folds_csv} (folds re-made since?). "
                             f"Delete {qcfg.run_dir} and re-run, pass name=<new> for a new quick run, or leave out "
                             "--quick to review/apply relabels.csv as it is.")
    console.print(f"[bold]--quick[/]: training {qcfg.model.name} at {qcfg.data.img_size} px for "
                  f"{qcfg.train.epochs} epochs on every fold -> {qcfg.run_dir}")
    train.run(qcfg, resume=True)
    return qcfg.run_dir


def run(cfg: Config, run_dir: str | Path | None = None, accept_above: float | None = None, apply: bool = False,
        quick: bool = False) -> pd.DataFrame:
    """Suggest (from OOF, when there is a run), merge with the decisions made, write the page, maybe apply."""
    if quick and run_dir is not None:
        raise KpipeError("--quick trains its own run; leave out --run (or leave out --quick to use that run).")
    csv_path = relabels_path(cfg)
    existing = read_relabels(csv_path)
    source = _quick_run(cfg) if quick else Path(run_dir) if run_dir is not None else cfg.run_dir
    oof = read_oof(source) if (source / "oof.csv").is_file() or existing is None else None
    ing = load_train(cfg)
    if oof is not None:
        classes, probs = oof_arrays(oof)
        fresh = find_suspects(oof["id"].tolist(), oof["label"].tolist(), probs, classes)
        table = merge_relabels(existing, fresh)
        console.print(f"{len(fresh)} suspects among {len(oof)} out-of-fold predictions of {source}")
    else:  # a person's own table (e.g. manual rows only) still reviews and applies
        assert existing is not None
        table = existing
        console.print(f"[yellow]no {source / 'oof.csv'}: using {csv_path} as it is, no new suggestions")
    if accept_above is not None:
        before = int((table["decision"] == "accept").sum())
        table = accept_above_threshold(table, accept_above)
        console.print(f"--accept-above {accept_above}: {int((table['decision'] == 'accept').sum()) - before} "
                      "more rows accepted")
    write_relabels(csv_path, table)
    write_review(review_path(cfg), table, ing.df, oof, csv_path.name)
    _print_top(table, csv_path, review_path(cfg))
    if apply:
        _apply(cfg, table, ing, csv_path)
    return table


def _print_top(table: pd.DataFrame, csv_path: Path, page: Path, n: int = 10) -> None:
    t = Table(title=f"top suspects ({len(table)} rows in {csv_path})")
    for col in COLUMNS:
        t.add_column(col, justify="right" if col == "score" else "left")
    for _, r in table.head(n).iterrows():
        t.add_row(*[fmt_score(r[c]) if c == "score" else str(r[c]) for c in COLUMNS])
    console.print(t)
    console.print(f"decisions: {decision_counts(table)}. Review page: {page}\nDecide in the decision column of {csv_path} "
                  "(accept / drop / keep) or with --accept-above SCORE; then run again with --apply.")


def _apply(cfg: Config, table: pd.DataFrame, ing: Ingest, csv_path: Path) -> None:
    from kpipe.stages.folds import apply_label_changes, clean_labels_path

    clean = build_clean_labels(table, dict(zip(ing.df["id"], ing.df["label"], strict=True)), ing.classes, str(csv_path))
    out = clean_labels_path(cfg)
    write_csv(out, clean)
    _, summary = apply_label_changes(ing.df[["id", "label"]], clean)
    t = Table(title=f"label changes in {out}")
    for col in ("class", "relabelled from", "relabelled to", "dropped"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for cls in [c for c in ing.classes if c in summary.index]:
        r = summary.loc[cls]
        t.add_row(str(cls), str(r["relabelled_from"]), str(r["relabelled_to"]), str(r["dropped"]))
    console.print(t)
    comp = cfg.competition.name
    console.print(f"wrote {out}: {int((clean['action'] == 'relabel').sum())} relabelled, "
                  f"{int((clean['action'] == 'drop').sum())} dropped; nothing under {cfg.data_dir} changed.\n"
                  f"next: kpipe folds --comp {comp}   then   kpipe train -c <exp.yaml> --comp {comp} name={cfg.name}_clean")
