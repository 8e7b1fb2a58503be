"""review.html for `kpipe relabel`: each suspect beside examples of its given and suggested class.

Self-contained: thumbnails are inlined (each class's examples once, in CSS), and every picture
links to its original file by a relative, URL-quoted path. Everything is HTML-escaped.
Usage: ``write_review(page, table, train_df, oof, "relabels.csv")``
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
import pandas as pd

from kpipe.data.image import ImageReadError, read_rgb
from kpipe.eval.oof import Oof
from kpipe.io import write_text

THUMB_PX = 96
REVIEW_LIMIT = 1000  # suspects shown on the page; the CSV always has them all


def exemplars(
    ids: list[str], labels: list[str], probs: np.ndarray, classes: list[str], exclude: set[str], n: int = 4
) -> dict[str, list[str]]:
    """Up to n confidently-correct ids per class (argmax = given, highest p first), for the review page."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in labels], dtype=int)
    p_given = probs[np.arange(len(y)), y] if len(y) else np.zeros(0)
    df = pd.DataFrame(
        {"id": ids, "label": labels, "p": p_given, "ok": probs.argmax(axis=1) == y if len(y) else []}
    )
    df = df[df["ok"] & ~df["id"].isin(exclude)].sort_values(
        ["p", "id"], ascending=[False, True], kind="mergesort"
    )
    return {c: g["id"].head(n).tolist() for c, g in df.groupby("label", sort=False)}


# ------------------------------------------------------------------ pure core: the decisions table


def decision_counts(table: pd.DataFrame) -> str:
    counts = table["decision"].replace("", "undecided").value_counts()
    return ", ".join(f"{n} {d}" for d, n in counts.items()) or "no rows"


def fmt_score(score: Any) -> str:
    return f"{float(score):.4f}" if pd.notna(score) and score != "" else ""


def thumbnail_bytes(path: str, size: int = THUMB_PX) -> tuple[str, bytes]:
    """(mime type, encoded bytes) of the image shrunk to fit size x size: PNG when tiny, where JPEG would smear it."""
    rgb = read_rgb(path)
    h, w = rgb.shape[:2]
    if max(h, w) > size:
        scale = size / max(h, w)
        rgb = cv2.resize(
            rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    png = max(rgb.shape[:2]) <= 48
    ok, buf = cv2.imencode(".png" if png else ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageReadError(path, "could not encode a thumbnail")
    return ("image/png" if png else "image/jpeg"), buf.tobytes()


def thumbnail_uri(path: str, size: int = THUMB_PX) -> str:
    """The thumbnail as a data: URI, for a page that must open without a server."""
    mime, data = thumbnail_bytes(path, size)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


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


def render_review(
    table: pd.DataFrame,
    paths: dict[str, str],
    examples: dict[str, list[str]],
    page_dir: Path,
    csv_name: str,
    limit: int = REVIEW_LIMIT,
) -> str:
    """The review page: each suspect's thumbnail beside examples of its given and suggested class."""
    thumbs = _Thumbs(paths, page_dir)
    esc = html.escape
    parts = []
    for rank, (_, r) in enumerate(table.head(limit).iterrows(), 1):
        groups = "".join(
            f"<div><div>{what} <b>{esc(str(cls))}</b></div>"
            f"{''.join(thumbs.example(i) for i in examples.get(cls, [])) or '<i>no examples</i>'}</div>"
            for what, cls in (("given", r["given"]), ("suggested", r["suggested"]))
        )
        parts.append(
            f'<section id="r{rank}"><div>#{rank} <b>{esc(r["id"])}</b>: given <b>{esc(r["given"])}</b> '
            f"&rarr; suggested <b>{esc(r['suggested'])}</b>, score {fmt_score(r['score']) or '&ndash;'}, "
            f'decision <span class="d">{esc(r["decision"] or "undecided")}</span>, source {esc(r["source"])}'
            f'</div><div class="row">{thumbs.figure(r["id"])}{groups}</div></section>'
        )
    more = (
        f"<p>Showing the first {limit} of {len(table)} rows; the CSV has them all.</p>"
        if len(table) > limit
        else ""
    )
    css = "\n".join(rule for _, rule in thumbs.css.values() if rule)
    link = f'<a href="{esc(quote(csv_name))}">{esc(csv_name)}</a>'
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>kpipe relabel review</title>'
        f"<style>{PAGE_CSS}\n{css}</style></head><body><h1>Suspected label errors ({len(table)})</h1>"
        f"<p>Decisions so far: {esc(decision_counts(table))}. Score = 1 &minus; the out-of-fold probability of the given "
        "label: near 1, the model is sure the label is wrong. Click a picture for the original file.</p>"
        f"<p>To decide, edit the <code>decision</code> column of {link}: <code>accept</code> (move the image "
        "to the suggested class), <code>drop</code> (leave it out), <code>keep</code> (the label is right); or "
        "accept every undecided row from a score up with <code>kpipe relabel ... --accept-above 0.9</code>. "
        "Add rows of your own with <code>source=manual</code>. Then <code>kpipe relabel ... --apply</code>, "
        f"<code>kpipe folds</code> and train a new experiment.</p>{more}{''.join(parts)}</body></html>\n"
    )


def pick_examples(
    table: pd.DataFrame, train_df: pd.DataFrame, oof: Oof | None, n: int = 4
) -> dict[str, list[str]]:
    """Examples per class, never a suspect: confidently-correct OOF rows, or any rows when there is no OOF."""
    if oof is not None:
        return exemplars(oof.ids, oof.labels, oof.probs, oof.classes, set(table["id"]), n)
    rest = train_df[~train_df["id"].isin(set(table["id"]))]
    return {c: g["id"].head(n).tolist() for c, g in rest.groupby("label")}


def write_review(
    page: Path,
    table: pd.DataFrame,
    train_df: pd.DataFrame,
    oof: Oof | None,
    csv_name: str = "relabels.csv",
    n_examples: int = 4,
) -> None:
    """review.html next to relabels.csv; examples are confidently-correct OOF rows (any rows without OOF)."""
    examples = pick_examples(table, train_df, oof, n_examples)
    files = dict(zip(train_df["id"], train_df["path"], strict=True))
    write_text(page, render_review(table, files, examples, page.parent, csv_name))
