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

import base64
import html
import os
import re
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from kpipe.config import Config, validate
from kpipe.data import Ingest, load_train
from kpipe.errors import KpipeError, preview
from kpipe.image import ImageReadError, read_rgb
from kpipe.io import read_csv_ids, write_csv, write_text

console = Console()

COLUMNS = ["id", "given", "suggested", "score", "decision", "source"]
DECISIONS = ("", "accept", "drop", "keep")
SOURCES = ("cleanlab", "manual")
QUICK_MAX_EPOCHS = 4
QUICK_LR = 2e-3
THUMB_PX = 96
REVIEW_LIMIT = 1000  # suspects shown on the page; the CSV always has them all


# ------------------------------------------------------------------ pure core: suspects


def oof_arrays(oof: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """(classes, probs) from an oof.csv table; classes come from its p_<class> columns, in order."""
    pcols = [c for c in oof.columns if c.startswith("p_")]
    if not pcols or not {"id", "label"} <= set(oof.columns):
        raise KpipeError(f"oof.csv needs columns id, label, p_<class>...; it has {list(oof.columns)}.")
    try:
        probs = oof[pcols].astype(float).to_numpy()
    except ValueError as e:
        raise KpipeError(f"oof.csv: a probability column is not numeric ({e}).") from None
    return [c[2:] for c in pcols], probs


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


def exemplars(ids: list[str], labels: list[str], probs: np.ndarray, classes: list[str],
              exclude: set[str], n: int = 4) -> dict[str, list[str]]:
    """Up to n confidently-correct ids per class (argmax = given, highest p first), for the review page."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in labels], dtype=int)
    p_given = probs[np.arange(len(y)), y] if len(y) else np.zeros(0)
    df = pd.DataFrame({"id": ids, "label": labels, "p": p_given, "ok": probs.argmax(axis=1) == y if len(y) else []})
    df = df[df["ok"] & ~df["id"].isin(exclude)].sort_values(["p", "id"], ascending=[False, True], kind="mergesort")
    return {c: g["id"].head(n).tolist() for c, g in df.groupby("label", sort=False)}


# ------------------------------------------------------------------ pure core: the decisions table


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
    from kpipe import train  # torch: only loaded when a model is trained

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
        t.add_row(*[_fmt(r[c]) if c == "score" else str(r[c]) for c in COLUMNS])
    console.print(t)
    console.print(f"decisions: {decision_counts(table)}. Review page: {page}\nDecide in the decision column of {csv_path} "
                  "(accept / drop / keep) or with --accept-above SCORE; then run again with --apply.")


def decision_counts(table: pd.DataFrame) -> str:
    counts = table["decision"].replace("", "undecided").value_counts()
    return ", ".join(f"{n} {d}" for d, n in counts.items()) or "no rows"


def _fmt(score: Any) -> str:
    return f"{float(score):.4f}" if pd.notna(score) and score != "" else ""


def _apply(cfg: Config, table: pd.DataFrame, ing: Ingest, csv_path: Path) -> None:
    from kpipe.folds import apply_label_changes, clean_labels_path

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


# ------------------------------------------------------------------ review page


def thumbnail_uri(path: str, size: int = THUMB_PX) -> str:
    """The image shrunk to fit size x size as a data: URI (PNG when tiny, where JPEG would smear it)."""
    rgb = read_rgb(path)
    h, w = rgb.shape[:2]
    if max(h, w) > size:
        scale = size / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    png = max(rgb.shape[:2]) <= 48
    ok, buf = cv2.imencode(".png" if png else ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageReadError(path, "could not encode a thumbnail")
    return f"data:image/{'png' if png else 'jpeg'};base64,{base64.b64encode(buf.tobytes()).decode('ascii')}"


def file_href(path: str, page_dir: Path) -> str:
    """A link from the page to the original file: relative and URL-quoted (spaces, unicode, '#', ':')."""
    target = Path(path).resolve()
    try:
        rel = os.path.relpath(target, page_dir.resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        return target.as_uri()
    return quote(Path(rel).as_posix())


class _Thumbs:
    """Thumbnails made once per id; example images are defined once in CSS and reused by class name."""

    def __init__(self, paths: dict[str, str], page_dir: Path) -> None:
        self.paths, self.page_dir = paths, page_dir
        self.css: dict[str, tuple[str, str]] = {}  # id -> (css class, rule)

    def _uri(self, image_id: str) -> tuple[str | None, str]:
        path = self.paths.get(image_id)
        if path is None:
            return None, "no usable image file"
        try:
            return thumbnail_uri(path), ""
        except ImageReadError as e:  # the page still lists the row; the reason shows instead
            return None, e.reason

    def figure(self, image_id: str) -> str:
        uri, why = self._uri(image_id)
        e = html.escape(image_id)
        img = f'<img src="{uri}" alt="{e}">' if uri else f'<span class="bad">{html.escape(why)}</span>'
        if image_id in self.paths:
            img = f'<a href="{html.escape(file_href(self.paths[image_id], self.page_dir))}">{img}</a>'
        return f"<figure>{img}<figcaption>{e}</figcaption></figure>"

    def example(self, image_id: str) -> str:
        if image_id not in self.css:
            uri, _ = self._uri(image_id)
            name = f"x{len(self.css)}"
            self.css[image_id] = (name, f'.{name}{{background-image:url("{uri}")}}' if uri else "")
        href = html.escape(file_href(self.paths[image_id], self.page_dir)) if image_id in self.paths else ""
        attrs = f'href="{href}" ' if href else ""
        return f'<a {attrs}class="t {self.css[image_id][0]}" title="{html.escape(image_id)}"></a>'


PAGE_CSS = """body{font-family:sans-serif;margin:1.5em}section{border-top:1px solid #ccc;padding:.6em 0}
.row{display:flex;gap:2em;align-items:flex-start}figure{margin:0;text-align:center}
img,.t{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#eee no-repeat center/contain;
display:inline-block;margin:2px}figcaption{font-size:80%;max-width:120px;word-break:break-all}
.bad{display:inline-block;width:96px;color:#b00;font-size:80%}.d{font-weight:bold}code{background:#f4f4f4}"""


def render_review(table: pd.DataFrame, paths: dict[str, str], examples: dict[str, list[str]], page_dir: Path,
                  csv_name: str, limit: int = REVIEW_LIMIT) -> str:
    """The review page: each suspect's thumbnail beside examples of its given and suggested class."""
    thumbs = _Thumbs(paths, page_dir)
    esc = html.escape
    parts = []
    for rank, (_, r) in enumerate(table.head(limit).iterrows(), 1):
        groups = "".join(
            f'<div><div>{what} <b>{esc(str(cls))}</b></div>'
            f'{"".join(thumbs.example(i) for i in examples.get(cls, [])) or "<i>no examples</i>"}</div>'
            for what, cls in (("given", r["given"]), ("suggested", r["suggested"])))
        parts.append(f'<section id="r{rank}"><div>#{rank} <b>{esc(r["id"])}</b>: given <b>{esc(r["given"])}</b> '
                     f'&rarr; suggested <b>{esc(r["suggested"])}</b>, score {_fmt(r["score"]) or "&ndash;"}, '
                     f'decision <span class="d">{esc(r["decision"] or "undecided")}</span>, source {esc(r["source"])}'
                     f'</div><div class="row">{thumbs.figure(r["id"])}{groups}</div></section>')
    more = f"<p>Showing the first {limit} of {len(table)} rows; the CSV has them all.</p>" if len(table) > limit else ""
    css = "\n".join(rule for _, rule in thumbs.css.values() if rule)
    link = f'<a href="{esc(quote(csv_name))}">{esc(csv_name)}</a>'
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>kpipe relabel review</title>"
            f"<style>{PAGE_CSS}\n{css}</style></head><body><h1>Suspected label errors ({len(table)})</h1>"
            f"<p>Decisions so far: {esc(decision_counts(table))}. Score = 1 &minus; the out-of-fold probability of the given "
            "label: near 1, the model is sure the label is wrong. Click a picture for the original file.</p>"
            f"<p>To decide, edit the <code>decision</code> column of {link}: <code>accept</code> (move the image "
            "to the suggested class), <code>drop</code> (leave it out), <code>keep</code> (the label is right); or "
            "accept every undecided row from a score up with <code>kpipe relabel ... --accept-above 0.9</code>. "
            "Add rows of your own with <code>source=manual</code>. Then <code>kpipe relabel ... --apply</code>, "
            f"<code>kpipe folds</code> and train a new experiment.</p>{more}{''.join(parts)}</body></html>\n")


def write_review(page: Path, table: pd.DataFrame, train_df: pd.DataFrame, oof: pd.DataFrame | None,
                 csv_name: str = "relabels.csv", n_examples: int = 4) -> None:
    """review.html next to relabels.csv; examples are confidently-correct OOF rows (any rows without OOF)."""
    if oof is not None:
        classes, probs = oof_arrays(oof)
        examples = exemplars(oof["id"].tolist(), oof["label"].tolist(), probs, classes, set(table["id"]), n_examples)
    else:
        rest = train_df[~train_df["id"].isin(set(table["id"]))]
        examples = {c: g["id"].head(n_examples).tolist() for c, g in rest.groupby("label")}
    paths = dict(zip(train_df["id"], train_df["path"], strict=True))
    write_text(page, render_review(table, paths, examples, page.parent, csv_name))
