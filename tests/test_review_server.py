"""`kpipe review`'s server, through its HTTP API (no browser): decisions land in relabels.csv at once."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from conftest import tiny_config, write_competition
from kpipe import cli, paths
from kpipe.config import Config
from kpipe.data import relabels
from kpipe.errors import KpipeError
from kpipe.io import read_csv_ids
from kpipe.stages import relabel, review

SUSPECTS = [
    ("cat_000", "cat", "dog", 0.9),
    ("dog_001", "dog", "fox", 0.8),
    ("fox_002", "fox", "cat", 0.7),
    ("cat_003", "cat", "fox", 0.6),
]


def write_suspects(cfg: Config) -> Path:
    """A relabels.csv as `kpipe relabel` writes it, all undecided, with a person's own notes column."""
    table = pd.DataFrame(
        [(i, g, s, sc, "", "cleanlab", "") for i, g, s, sc in SUSPECTS], columns=[*relabels.COLUMNS, "note"]
    )
    table.loc[1, "note"] = "blurry, check"
    path = paths.relabels_csv(cfg)
    relabels.write_relabels(path, relabels.normalise_relabels(table, "test"))
    return path


def serve(cfg: Config) -> tuple[review.ReviewServer, threading.Thread]:
    server = review.make_server(cfg, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def server(tiny_cfg: Config) -> Iterator[review.ReviewServer]:
    write_suspects(tiny_cfg)
    srv, thread = serve(tiny_cfg)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def get(srv: review.ReviewServer, path: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(srv.url.rstrip("/") + path, timeout=10) as r:
            return r.status, r.read(), r.headers.get_content_type()
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get_content_type()


def post(srv: review.ReviewServer, body: object, mime: str = "application/json") -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        srv.url + "api/decide", data=data, headers={"Content-Type": mime}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def decisions(path: Path) -> dict[str, str]:
    table = relabels.read_relabels(path)
    return dict(zip(table["id"], table["decision"], strict=True))


def test_page_rows_and_decisions_written_at_once(server: review.ReviewServer) -> None:
    csv = server.state.csv
    status, body, mime = get(server, "/")
    assert status == 200 and mime == "text/html" and b"api/decide" in body
    rows = json.loads(get(server, "/api/rows")[1])
    assert [r["id"] for r in rows["rows"]] == [s[0] for s in SUSPECTS]
    assert rows["classes"] == ["cat", "dog", "fox"] and rows["rows"][0]["score"] == 0.9
    assert all(i not in {s[0] for s in SUSPECTS} for ids in rows["examples"].values() for i in ids)

    assert post(server, {"id": "cat_000", "decision": "accept"})[0] == 200
    assert decisions(csv)["cat_000"] == "accept"  # on disk before the next click
    status, body = post(server, {"id": "dog_001", "decision": "drop"})
    assert status == 200 and {r["id"]: r["decision"] for r in json.loads(body)["rows"]}["dog_001"] == "drop"
    assert post(server, {"id": "fox_002", "decision": "accept", "suggested": "dog"})[0] == 200
    table = relabels.read_relabels(csv)
    assert decisions(csv) == {"cat_000": "accept", "dog_001": "drop", "fox_002": "accept", "cat_003": ""}
    assert table.set_index("id").loc["fox_002", "suggested"] == "dog"
    assert table.set_index("id").loc["dog_001", "note"] == "blurry, check"  # a person's column survives
    again = json.loads(get(server, "/api/rows")[1])  # a reload shows the saved state
    assert {r["id"]: r["decision"] for r in again["rows"]} == decisions(csv)
    assert post(server, {"id": "cat_000", "decision": ""})[0] == 200  # undecide
    assert decisions(csv)["cat_000"] == ""


@pytest.mark.parametrize(
    ("body", "mime", "code"),
    [
        ({"id": "nobody", "decision": "accept"}, "application/json", 404),
        ({"id": "cat_000", "decision": "maybe"}, "application/json", 400),
        ({"id": "cat_000", "decision": "accept", "suggested": "wolf"}, "application/json", 400),
        ({"decision": "accept"}, "application/json", 400),
        (b"{not json", "application/json", 400),
        (b"id=cat_000&decision=accept", "application/x-www-form-urlencoded", 415),
    ],
)
def test_bad_decisions_are_refused_and_change_nothing(
    server: review.ReviewServer, body: object, mime: str, code: int
) -> None:
    before = server.state.csv.read_bytes()
    status, text = post(server, body, mime)
    assert status == code, text
    assert server.state.csv.read_bytes() == before


@pytest.mark.parametrize(
    "url",
    [
        "/img?id=../../tiny.yaml",
        "/img?id=..%2F..%2Ftiny.yaml",
        "/img?id=nobody",
        "/img?id=/etc/passwd",
        "/../tiny.yaml",
        "/img/../../tiny.yaml",
        "/relabels.csv",
        "/img?id=cat_000&id=dog_001",
    ],
)
def test_only_training_images_by_id_are_served(server: review.ReviewServer, url: str) -> None:
    status, body, _ = get(server, url)
    assert status == 404, body


def test_thumbnail_of_a_training_id(server: review.ReviewServer) -> None:
    status, body, mime = get(server, "/img?id=cat_000")
    assert status == 200 and mime == "image/png" and body.startswith(b"\x89PNG")


def test_image_outside_the_competition_folder_is_not_served(
    server: review.ReviewServer, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes((server.state.image_root / "train" / "cat_000.png").read_bytes())
    server.state.files["cat_000"] = str(outside)  # as if the ingest table pointed outside
    assert get(server, "/img?id=cat_000")[0] == 404


def test_two_writers_keep_each_others_decisions(server: review.ReviewServer) -> None:
    """Many decisions from two 'tabs' at once: every one is in the file afterwards."""
    plan = {s[0]: d for s, d in zip(SUSPECTS, ["accept", "drop", "keep", "drop"], strict=True)}
    results: list[int] = []

    def tab(ids: list[str]) -> None:
        for _ in range(5):
            for i in ids:
                results.append(post(server, {"id": i, "decision": plan[i]})[0])

    ids = list(plan)
    tabs = [threading.Thread(target=tab, args=(ids[k::2],)) for k in (0, 1)]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join(60)
    assert results == [200] * 20
    assert decisions(server.state.csv) == plan


def test_set_decision_keeps_a_concurrent_write(tiny_cfg: Config) -> None:
    """The library call re-reads under the lock: a decision written between two calls survives."""
    csv = write_suspects(tiny_cfg)
    relabels.set_decision(csv, "cat_000", "accept")
    relabels.set_decision(csv, "dog_001", "keep")
    assert decisions(csv) == {"cat_000": "accept", "dog_001": "keep", "fox_002": "", "cat_003": ""}
    with pytest.raises(relabels.UnknownId, match="nobody"):
        relabels.set_decision(csv, "nobody", "drop")


def test_no_relabels_csv_says_what_to_run(tiny_cfg: Config) -> None:
    with pytest.raises(KpipeError, match="kpipe relabel"):
        review.make_server(tiny_cfg, 0)


def test_apply_after_clicks_equals_apply_after_typing(tmp_path: Path) -> None:
    """Decisions made through the server give the same labels_clean.csv as the same decisions typed in."""
    clicks = [
        ("cat_000", "accept", None),
        ("dog_001", "drop", None),
        ("fox_002", "accept", "dog"),
        ("cat_003", "keep", None),
    ]
    clean = []
    for how in ("server", "typed"):
        root = tmp_path / how
        root.mkdir()
        cfg = tiny_config(root, write_competition(root))
        csv = write_suspects(cfg)
        if how == "server":
            srv, thread = serve(cfg)
            for image_id, decision, suggested in clicks:
                body = {
                    "id": image_id,
                    "decision": decision,
                    **({"suggested": suggested} if suggested else {}),
                }
                assert post(srv, body)[0] == 200
            srv.shutdown()
            srv.server_close()
            thread.join(5)
        else:
            table = read_csv_ids(csv)
            for image_id, decision, suggested in clicks:
                table.loc[table["id"] == image_id, "decision"] = decision
                if suggested:
                    table.loc[table["id"] == image_id, "suggested"] = suggested
            table.to_csv(csv, index=False)
        relabel.run(cfg, apply=True)
        clean.append(paths.clean_labels_csv(cfg).read_bytes())
    assert clean[0] == clean[1]
    assert clean[0].decode().splitlines() == [
        "id,label,action",
        "cat_000,dog,relabel",
        "dog_001,dog,drop",
        "fox_002,dog,relabel",
    ]


def test_cli_has_review_with_port() -> None:
    args = cli.build_parser().parse_args(["review", "-c", "x.yaml", "--comp", "tiny", "--port", "8123"])
    assert args.port == 8123 and args.fn is cli._review
