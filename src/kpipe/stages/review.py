"""`kpipe review`: decide relabels with a click, on a small server at 127.0.0.1 that writes relabels.csv.

It serves the page of kpipe.eval.review_app and three calls: GET api/rows (the table as relabels.csv
holds it now, the classes, and confidently-correct examples of each class), GET img?id=ID (a thumbnail
of that training image: the id is looked up in the ingest table, and the file must lie under the
competition's data folder; no URL path is ever opened as a file), and POST api/decide with JSON
{"id", "decision" in accept/drop/keep/"", optional "suggested" class}, which sets that id's rows under
a file lock and writes the file atomically (kpipe.data.relabels.set_decision). Only JSON posts are
taken, so a page on another site cannot post a decision without the browser asking first (and no
one answers). The static review.html stays for reading without a server.
Usage: ``kpipe review -c configs/exp/demo.yaml --comp demo [--port 8765]``
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pandas as pd

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console, safe
from kpipe.data.image import ImageReadError
from kpipe.data.ingest import load_train
from kpipe.data.relabels import DECISIONS, UnknownId, read_relabels, set_decision
from kpipe.errors import KpipeError
from kpipe.eval.oof import read_oof
from kpipe.eval.review import pick_examples, thumbnail_bytes
from kpipe.eval.review_app import render_app

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # a decision is a few dozen bytes


@dataclass(frozen=True)
class ReviewState:
    """What the server knows besides relabels.csv, which it re-reads on every request."""

    csv: Path
    title: str
    classes: list[str]
    files: dict[str, str]  # training id -> image path, from the ingest table
    image_root: Path  # the competition's data folder, resolved: nothing outside it is served
    examples: dict[str, list[str]]


# ------------------------------------------------------------------ pure helpers


def rows_payload(table: pd.DataFrame, state: ReviewState) -> dict[str, Any]:
    """The JSON the page draws from: rows in file order, scores as numbers or null."""
    rows = [
        {
            "id": r["id"],
            "given": r["given"],
            "suggested": r["suggested"],
            "score": None if pd.isna(r["score"]) else round(float(r["score"]), 4),
            "decision": r["decision"],
            "source": r["source"],
        }
        for _, r in table.iterrows()
    ]
    return {"classes": state.classes, "examples": state.examples, "rows": rows}


def parse_decision(body: bytes, classes: list[str]) -> tuple[str, str, str | None]:
    """(id, decision, suggested or None) from a POST body; ValueError says what is wrong with it."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the body is not JSON ({e})") from e
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("id"), str)
        or not isinstance(obj.get("decision"), str)
    ):
        raise ValueError('expected {"id": "...", "decision": "accept|drop|keep|", "suggested": "<class>"}')
    if obj["decision"] not in DECISIONS:
        raise ValueError(f"decision '{obj['decision']}' is not one of accept, drop, keep or empty")
    suggested = obj.get("suggested")
    if suggested is not None and (not isinstance(suggested, str) or suggested not in classes):
        raise ValueError(f"suggested class '{suggested}' is not a class of this competition")
    return obj["id"], obj["decision"], suggested


def image_file(state: ReviewState, image_id: str) -> Path | None:
    """The file of a training id, or None: unknown ids and files outside the competition folder are not served."""
    path = state.files.get(image_id)
    if path is None:
        return None
    resolved = Path(path).resolve()
    return resolved if resolved.is_relative_to(state.image_root) and resolved.is_file() else None


# ------------------------------------------------------------------ the server


class _Handler(BaseHTTPRequestHandler):
    server: ReviewServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        log.debug("review %s: " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, mime: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(body)))
        self.send_header(
            "Cache-Control", "no-store" if mime.startswith(("application/json", "text/")) else "max-age=300"
        )
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode("utf-8"), "text/plain; charset=utf-8")

    def _json(self, obj: Any) -> None:
        self._send(HTTPStatus.OK, json.dumps(obj).encode("utf-8"), "application/json")

    def _rows(self) -> None:
        table = read_relabels(self.server.state.csv)
        if table is None:
            self._text(HTTPStatus.NOT_FOUND, f"{self.server.state.csv} is gone; run `kpipe relabel` again.")
            return
        self._json(rows_payload(table, self.server.state))

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        url = urlsplit(self.path)
        state = self.server.state
        try:
            if url.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, render_app(state.title).encode("utf-8"), "text/html; charset=utf-8")
            elif url.path == "/api/rows":
                self._rows()
            elif url.path == "/img":
                ids = parse_qs(url.query).get("id", [])
                path = image_file(state, ids[0]) if len(ids) == 1 else None
                if path is None:
                    self._text(HTTPStatus.NOT_FOUND, "no training image with that id")
                    return
                mime, data = thumbnail_bytes(str(path))
                self._send(HTTPStatus.OK, data, mime)
            else:
                self._text(HTTPStatus.NOT_FOUND, "not found")
        except ImageReadError as e:
            self._text(HTTPStatus.UNPROCESSABLE_ENTITY, e.reason)
        except KpipeError as e:  # relabels.csv edited into something unreadable: say so in the page
            self._text(HTTPStatus.CONFLICT, str(e))

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        if urlsplit(self.path).path != "/api/decide":
            self._text(HTTPStatus.NOT_FOUND, "not found")
            return
        if self.headers.get_content_type() != "application/json":
            self._text(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the decision as application/json")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            self._text(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length else HTTPStatus.LENGTH_REQUIRED,
                f"a decision is a small JSON object (at most {MAX_BODY} bytes)",
            )
            return
        state = self.server.state
        try:
            image_id, decision, suggested = parse_decision(self.rfile.read(length), state.classes)
        except ValueError as e:
            self._text(HTTPStatus.BAD_REQUEST, str(e))
            return
        try:
            table = set_decision(state.csv, image_id, decision, suggested)
        except UnknownId as e:
            self._text(HTTPStatus.NOT_FOUND, str(e))
            return
        except KpipeError as e:
            self._text(HTTPStatus.CONFLICT, str(e))
            return
        log.info(
            "review: %s -> %s%s", image_id, decision or "undecided", f" as {suggested}" if suggested else ""
        )
        self._json(rows_payload(table, state))


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: ReviewState) -> None:
        super().__init__(address, _Handler)
        self.state = state

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def load_state(cfg: Config) -> ReviewState:
    """Everything but the table: classes and image files from the ingest, examples from the run's OOF if any."""
    csv = paths.relabels_csv(cfg)
    table = read_relabels(csv)
    if table is None:
        raise KpipeError(
            f"{csv} does not exist: run `kpipe relabel -c <exp.yaml> --comp {cfg.competition.name}` "
            "first to find the suspects."
        )
    ing = load_train(cfg)
    run_oof = paths.run_dir(cfg).oof
    oof = read_oof(run_oof) if run_oof.is_file() else None
    return ReviewState(
        csv=csv,
        title=cfg.competition.name,
        classes=list(ing.classes),
        files=dict(zip(ing.df["id"], ing.df["path"], strict=True)),
        image_root=paths.data_dir(cfg).resolve(),
        examples=pick_examples(table, ing.df, oof),
    )


def make_server(cfg: Config, port: int = 0, host: str = "127.0.0.1") -> ReviewServer:
    """A bound, not yet serving, server (port 0 = a free port); tests run serve_forever in a thread."""
    state = load_state(cfg)
    try:
        return ReviewServer((host, port), state)
    except OSError as e:
        raise KpipeError(
            f"cannot listen on {host}:{port} ({e.strerror}). Pick another --port, "
            "or leave it out for a free one."
        ) from e


def run(cfg: Config, port: int | None = None) -> None:
    """Serve until Ctrl-C; every decision is already in relabels.csv when it is clicked."""
    server = make_server(cfg, port or 0)
    console.print(
        f"review page: [bold]{server.url}[/] (Ctrl-C stops it)\n"
        f"decisions are written to {safe(server.state.csv)} at once; then "
        f"kpipe relabel ... --apply"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("review server stopped")
    finally:
        server.server_close()
