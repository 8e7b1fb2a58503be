"""Kaggle I/O: download a competition's files, submit with a ledger row, sync the leaderboard.

Everything goes through the kaggle package's Python API (`KaggleApi` and the kagglesdk
client it builds), so credentials, proxies and endpoints are the kaggle client's own.
Credentials are looked for where that client looks *before* it is called (its
`authenticate()` prints help and calls `exit(1)` when it finds none); they are never
printed, logged or written. 401/403/404 become KpipeErrors that say what to do; 429, 5xx
and dropped connections are retried with bounded exponential backoff. The first retry delay
comes from $KPIPE_KAGGLE_BACKOFF (default 2 s), the first poll of `--wait` from
$KPIPE_KAGGLE_POLL (default 10 s), the longest wait from $KPIPE_KAGGLE_WAIT_TIMEOUT (1800 s).
Usage: ``download(cfg); submit(cfg, Path("submissions/r50.csv"), "r50 5 folds", wait=True, force=False); lb(cfg)``
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import requests
from kagglesdk.competitions.types.competition_api_service import (
    ApiGetCompetitionRequest,
    ApiGetLeaderboardRequest,
    ApiGetSubmissionRequest,
)
from rich.markup import escape

from kpipe import paths
from kpipe.config import Config, relative_name
from kpipe.console import console, err_console, print_problems, safe
from kpipe.errors import KpipeError
from kpipe.eval.metrics import higher_is_better
from kpipe.io import write_json
from kpipe.kaggle import ledger
from kpipe.kaggle.api import (  # noqa: F401  (ENV_BACKOFF, credential_source: part of this module's API)
    ENV_BACKOFF,
    ENV_POLL,
    ENV_WAIT_TIMEOUT,
    Backoff,
    KaggleError,
    T,
    _env_seconds,
    _UploadFailed,
    call,
    connect,
    credential_source,
    kaggle_slug,
    retry_policy,
)
from kpipe.kaggle.submission import validate_file

MARKER = ".kpipe-download.json"  # written last: its presence means the download completed


def is_complete(dest: Path, slug: str) -> bool:
    """True when `dest` holds every file the last finished download of `slug` wrote, at its size."""
    try:
        marker = json.loads((dest / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        if marker["slug"] != slug:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((dest / rel).is_file() and (dest / rel).stat().st_size == size for rel, size in files.items())


def download(cfg: Config, force: bool = False, *, file: str | None = None) -> Path:
    """Fetch the competition's files (or one `file`) into paths.data_dir(cfg), unzipped; skip what is there."""
    slug, dest = kaggle_slug(cfg), paths.data_dir(cfg)
    target = dest if file is None else dest / relative_name(file, "kaggle download --file")
    if not force and (is_complete(dest, slug) if file is None else target.exists()):
        console.print(
            safe(f"{target}: already downloaded from '{slug}'; pass --force to download again."),
            soft_wrap=True,
        )
        return target
    api, backoff = connect(), retry_policy()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Staging next to the target keeps every final move a same-filesystem rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.download-", dir=dest.parent))
    try:
        fetched, unpacked = staging / "fetched", staging / "unpacked"
        fn, args, what = (
            (api.competition_download_files, (slug,), f"downloading the files of '{slug}'")
            if file is None
            else (api.competition_download_file, (slug, file), f"downloading '{file}' of '{slug}'")
        )
        call(fn, *args, path=str(fetched), force=True, quiet=True, what=what, slug=slug, backoff=backoff)
        _unpack(fetched, unpacked, keep=Path(file).name if file else None)
        inventory = _inventory(unpacked)
        _install(unpacked, target.parent if file else dest, staging / "replaced", reset_marker=file is None)
        if file is None:
            write_json(dest / MARKER, {"slug": slug, "downloaded_utc": ledger.now_utc(), "files": inventory})
    finally:
        shutil.rmtree(staging)
    console.print(
        safe(f"{target}: downloaded {len(inventory)} files from Kaggle competition '{slug}'."), soft_wrap=True
    )
    return target


def _unpack(fetched: Path, out: Path, keep: str | None) -> None:
    """Extract each downloaded archive into `out` (a file asked for by name is kept as is)."""
    out.mkdir(parents=True)
    for item in sorted(fetched.iterdir()):
        if item.name.endswith(".kaggle-partial"):  # the client's resume bookkeeping
            continue
        if item.name != keep and zipfile.is_zipfile(item):
            with zipfile.ZipFile(item) as zf:
                zf.extractall(out)  # zipfile drops absolute paths and '..' parts of member names
            item.unlink()  # free the space before the next one
        else:
            os.replace(item, out / item.name)
    for inner in sorted(out.glob("*.zip")):  # old competitions zip train/ and test/ inside the zip
        with zipfile.ZipFile(inner) as zf:
            # One top-level folder or file names its own place; loose files get a folder named after the zip.
            tops = {n.split("/", 1)[0] for n in zf.namelist()}
            zf.extractall(out if len(tops) == 1 else out / inner.stem)
        inner.unlink()


def _inventory(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _install(unpacked: Path, target: Path, trash: Path, reset_marker: bool) -> None:
    """Move each unpacked entry into `target`, replacing same-named ones; keep everything else
    (kpipe's own audit/ and relabels.csv live in the data folder too)."""
    target.mkdir(parents=True, exist_ok=True)
    if reset_marker:  # incomplete until the new marker is written
        (target / MARKER).unlink(missing_ok=True)
    for entry in sorted(unpacked.iterdir()):
        final = target / entry.name
        if final.exists() or final.is_symlink():
            trash.mkdir(parents=True, exist_ok=True)
            os.replace(final, trash / entry.name)
        os.replace(entry, final)


# ------------------------------------------------------------------ submit


def _check_submission(path: Path, cfg: Config) -> None:
    if not path.is_file():
        raise KpipeError(f"{path}: no such file. Give the CSV `kpipe infer` wrote (submissions/<name>.csv).")
    problems = validate_file(path, cfg)
    print_problems([p for p in problems if p.severity != "error"])
    errors = [p.render() for p in problems if p.severity == "error"]
    if errors:
        raise KpipeError(
            f"{path}: not a valid submission for '{cfg.competition.name}', so nothing was "
            "uploaded:\n  " + "\n  ".join(errors)
        )


def submit(
    cfg: Config, path: Path, message: str | None, wait: bool = False, force: bool = False
) -> dict[str, Any]:
    """Validate `path`, upload it, record it in the ledger; with `wait`, poll until it is scored.

    No message (None or blank) means one made from the sidecar: '<name>: runs a+b, CV 0.9123 accuracy'.

    Returns the ledger row plus "remaining" (submissions left today, None when unknown).
    A submission Kaggle could not score is recorded (status=error), then raised as a KpipeError.
    """
    slug, path = kaggle_slug(cfg), Path(path)
    _check_submission(path, cfg)
    ledger.check_sidecar(path)
    message = message.strip() if message and message.strip() else ledger.default_message(path)
    prov, book = ledger.provenance(path), paths.ledger_csv(cfg)
    commit, dirty = ledger.git_state()
    started = datetime.now(UTC)
    row = ledger.make_row(
        {
            **prov,
            "time_utc": _iso(started),
            "competition": slug,
            "file": str(path),
            "message": message,
            "git_commit": commit,
            "git_dirty": dirty,
            "source": "kpipe",
            "kaggle_ref": "",
            "status": "pending",
        }
    )
    # The duplicate check and the ledger row in one lock: of two submits of one file at once, one uploads.
    same = ledger.reserve(book, row, force)
    if len(same):
        r = same.iloc[-1]
        state = (
            " (its upload may have been cut off: `kpipe lb` shows whether Kaggle has it)"
            if r["status"] == "uploading"
            else ""
        )
        raise KpipeError(
            f"{path}: byte-identical to {r['file']} submitted {r['time_utc']} "
            f"(ref {r['kaggle_ref'] or '?'}, '{r['message']}'){state}; not submitted again. "
            "Pass --force to submit it anyway."
        )
    api, backoff, ref = _upload_reserved(book, row, path, message, slug, started)
    row = {**row, "kaggle_ref": ref, "status": "pending"}
    left = remaining(api, slug, backoff)
    console.print(
        safe(
            f"submitted {path} to '{slug}' (ref {ref or 'unknown'}); submissions left today: "
            f"{'unknown' if left is None else left}."
        ),
        soft_wrap=True,
    )
    result: dict[str, Any] = {**row, "remaining": left}
    if wait and not ref:
        console.print(
            safe(
                "Kaggle did not say which submission this is, so there is nothing to wait on; "
                "`kpipe lb` matches it by file name and time and fills in its score."
            ),
            soft_wrap=True,
        )
    return _wait_and_record(api, slug, ref, backoff, book, result) if wait and ref else result


def _wait_and_record(
    api: Any, slug: str, ref: str, backoff: Backoff, book: Path, result: dict[str, Any]
) -> dict[str, Any]:
    """--wait: poll until the submission is scored (or fails), put the scores in the ledger row and print them."""
    final = wait_for(api, slug, ref, backoff)
    scored = {k: final[k] for k in ("status", "public_score", "private_score", "error")}
    ledger.update_ref(book, slug, ref, scored)
    result = {**result, **scored}
    _report(result)
    return result


def submit_kernel(
    cfg: Config,
    kernel: str,
    version: int | None,
    message: str | None,
    wait: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """A code-competition submission: Kaggle re-runs notebook `kernel` (OWNER/SLUG) at `version` on the hidden
    test. Recorded in the ledger like a CSV one, with the kernel, its version and the package's sha256
    (runs and CV from package/<name>/ when it is there); with `wait`, polled until scored."""
    slug = kaggle_slug(cfg)
    if kernel.count("/") != 1:
        raise KpipeError(
            f"--kernel {kernel!r}: expected OWNER/SLUG, as in kernels/<name>/kernel-metadata.json's id."
        )
    pkg = paths.package_dir(cfg)
    man = json.loads(pkg.manifest.read_text(encoding="utf-8")) if pkg.manifest.is_file() else {}
    spec = json.loads(pkg.spec.read_text(encoding="utf-8")) if pkg.spec.is_file() else {}
    if not man:
        err_console.print(
            safe(f"no {pkg.manifest}: the ledger row gets no package sha256, runs or CV."), soft_wrap=True
        )
    label = f"v{version}" if version else "latest"
    message = (
        message.strip()
        if message and message.strip()
        else (f"{kernel} {label}" + (f", CV {spec['cv']:.4f}" if spec.get("cv") is not None else ""))
    )
    identity = f"{kernel}@{label}:{man.get('sha256', '')}"
    started = datetime.now(UTC)
    commit, dirty = ledger.git_state()
    row = ledger.make_row(
        {
            "time_utc": _iso(started),
            "competition": slug,
            "file": f"kernel:{kernel}@{label}",
            "sha256": hashlib.sha256(identity.encode()).hexdigest(),
            "message": message,
            "git_commit": commit,
            "git_dirty": dirty,
            "runs": [r["source"] for r in spec.get("runs", [])],
            "cv": spec.get("cv"),
            "metric": spec.get("metric"),
            "source": "kpipe",
            "kaggle_ref": "",
            "status": "pending",
            "kernel": kernel,
            "kernel_version": version or "",
            "package_sha256": man.get("sha256", ""),
        }
    )
    book = paths.ledger_csv(cfg)
    same = ledger.reserve(book, row, force)
    if len(same):
        r = same.iloc[-1]
        raise KpipeError(
            f"{kernel} {label} with this package was submitted {r['time_utc']} (ref {r['kaggle_ref'] or '?'}); "
            "not submitted again. Push a new version (kpipe kernel --push), or pass --force."
        )
    try:
        api, backoff = connect(), retry_policy()
        if remaining(api, slug, backoff) == 0:
            raise KpipeError(
                f"no submissions left today for '{slug}' (Kaggle's daily limit; it resets at 00:00 UTC). "
                f"{kernel} was not submitted."
            )
        response = call(
            api.competition_submit_code,
            "submission.csv",
            message,
            slug,
            kernel,
            version,
            quiet=True,
            what=f"submitting notebook {kernel}",
            slug=slug,
            backoff=backoff,
        )
    except BaseException:
        ledger.release(book, row)
        raise
    ref = str(response.ref) if response.ref else ""
    ledger.settle(book, row, {"kaggle_ref": ref, "status": "pending"})
    row = {**row, "kaggle_ref": ref, "status": "pending"}
    console.print(
        safe(f"submitted notebook {kernel} {label} to '{slug}' (ref {ref or 'unknown'})."), soft_wrap=True
    )
    result: dict[str, Any] = dict(row)
    return _wait_and_record(api, slug, ref, backoff, book, result) if wait and ref else result


def _upload_reserved(
    book: Path, row: dict[str, str], path: Path, message: str, slug: str, started: datetime
) -> tuple[Any, Backoff, str]:
    """Upload the file `ledger.reserve` wrote `row` for; the row gets the ref. When nothing was uploaded (no
    connection, no submissions left, a refusal, Ctrl-C before the upload) the row is removed; a Ctrl-C during
    the upload leaves it "uploading" (Kaggle may have the file; `kpipe lb` tells). Returns (api, backoff, ref)."""
    uploading = False
    try:
        api, backoff = connect(), retry_policy()
        if remaining(api, slug, backoff) == 0:
            raise KpipeError(
                f"no submissions left today for '{slug}' (Kaggle's daily limit; it resets at "
                f"00:00 UTC). {path} was not uploaded."
            )
        uploading = True
        ref = _upload(api, path, message, slug, backoff, started)
    except (
        Exception
    ):  # refused, or failed after retries (which ask Kaggle whether the file landed): not uploaded
        ledger.release(book, row)
        raise
    except BaseException:  # Ctrl-C: before the upload nothing happened; during it, Kaggle may have the file
        if not uploading:
            ledger.release(book, row)
        raise
    ledger.settle(book, row, {"kaggle_ref": ref, "status": "pending"})
    return api, backoff, ref


def _report(row: dict[str, Any]) -> None:
    name = Path(row["file"]).name
    if row["status"] == "error":
        raise KpipeError(
            f"Kaggle could not score {name} (ref {row['kaggle_ref']}): "
            f"{row['error'] or 'no reason given'}. The ledger row says status=error."
        )
    if row["status"] == "complete":
        named = (("public", "public_score"), ("private", "private_score"), ("CV", "cv"))
        scores = [f"{k} {row[c]}" for k, c in named if row[c]]
        console.print(safe(f"{name}: " + ", ".join(scores or ["scored"])), soft_wrap=True)


def remaining(api: Any, slug: str, backoff: Backoff) -> int | None:
    """Submissions left today: Kaggle's own count; else its daily maximum minus today's; else None."""
    try:
        limits = call(
            api.competition_get_submission_limits,
            slug,
            what="reading the submission limits",
            slug=slug,
            backoff=backoff,
        )
        return int(limits.num_allowed_now)
    except KaggleError as e:
        if e.status in (401, 403):
            raise
    try:  # a server without the limits endpoint: derive it
        with api.build_kaggle_client() as client:
            comp = call(
                client.competitions.competition_api_client.get_competition,
                _request(ApiGetCompetitionRequest, competition_name=slug),
                what="reading the competition",
                slug=slug,
                backoff=backoff,
            )
        if not comp.max_daily_submissions:
            return None
        today = datetime.now(UTC).date().isoformat()
        used = sum(s["time_utc"].startswith(today) for s in list_submissions(api, slug, backoff))
        return max(0, comp.max_daily_submissions - used)
    except KaggleError as e:
        if e.status in (401, 403):
            raise
        return None


def _upload(api: Any, path: Path, message: str, slug: str, backoff: Backoff, started: datetime) -> str:
    """competition_submit with retries that never submit twice; returns Kaggle's ref ('' if unknown)."""

    def once() -> str:
        response = api.competition_submit(str(path), message, slug, quiet=True)
        if response.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
            raise _UploadFailed(f"uploading {path.name} failed")
        return str(response.ref) if response.ref else ""

    def recover() -> str | None:
        return _find_remote(api, slug, path.name, message, started)

    ref = call(once, what=f"submitting {path.name}", slug=slug, backoff=backoff, recover=recover)
    return ref or recover() or ""  # an answer without the id: look it up in the list


def _find_remote(api: Any, slug: str, name: str, message: str, since: datetime) -> str | None:
    """The ref of a submission of `name` with `message` made since `since`, if Kaggle lists one."""
    try:
        subs = [_remote_row(s) for s in api.competition_submissions(slug, page_number=1, page_size=20) or []]
    except requests.RequestException:
        return None  # the caller retries or records the row without a ref; `kpipe lb` matches it later
    for s in subs:
        t = ledger.parse_time(s["time_utc"])
        if (
            s["file"] == name
            and s["message"] == message
            and t is not None
            and t >= since - timedelta(minutes=2)
        ):
            return s["kaggle_ref"]
    return None


def _request(cls: type[T], **fields: Any) -> T:
    """A kagglesdk request object (their constructors take no arguments)."""
    request = cls()
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def _iso(t: datetime) -> str:
    t = t if t.tzinfo else t.replace(tzinfo=UTC)  # Kaggle's times are naive UTC
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _remote_row(sub: Any) -> dict[str, str]:
    """An ApiSubmission as ledger cells, plus team_name and total_bytes for lb."""
    status = sub.status.name.lower() if sub.status is not None else ""
    return {
        "kaggle_ref": str(sub.ref),
        "time_utc": _iso(sub.date) if sub.date else "",
        "file": sub.file_name or "",
        "message": sub.description or "",
        "status": status,
        "public_score": sub.public_score or "",
        "private_score": sub.private_score or "",
        "error": (sub.error_description or "") if status == "error" else "",
        "team_name": sub.team_name or "",
        "total_bytes": str(sub.total_bytes or ""),
    }


def wait_for(api: Any, slug: str, ref: str, backoff: Backoff) -> dict[str, str]:
    """Poll submission `ref` with growing pauses until COMPLETE or ERROR (or the wait timeout)."""
    delay, timeout = _env_seconds(ENV_POLL, 10.0), _env_seconds(ENV_WAIT_TIMEOUT, 1800.0)
    deadline = time.monotonic() + timeout
    with api.build_kaggle_client() as client:
        while True:
            request = _request(ApiGetSubmissionRequest, ref=int(ref))
            sub = call(
                client.competitions.competition_api_client.get_submission,
                request,
                what=f"checking submission {ref}",
                slug=slug,
                backoff=backoff,
            )
            row = _remote_row(sub)
            if row["status"] != "pending":
                return row
            if time.monotonic() + delay > deadline:
                console.print(
                    safe(
                        f"submission {ref} is still being scored after {timeout:.0f} s; "
                        "`kpipe lb` picks up its score later."
                    ),
                    soft_wrap=True,
                )
                return row
            time.sleep(delay)
            delay = min(60.0, delay * 1.5)


# ------------------------------------------------------------------ leaderboard


def list_submissions(
    api: Any, slug: str, backoff: Backoff, page_size: int = 50, max_pages: int = 40
) -> list[dict[str, str]]:
    """Every submission of ours Kaggle lists for `slug` (kpipe's and the kaggle CLI's), newest first."""
    out: list[dict[str, str]] = []
    for page in range(1, max_pages + 1):
        subs = (
            call(
                api.competition_submissions,
                slug,
                page_number=page,
                page_size=page_size,
                what="listing submissions",
                slug=slug,
                backoff=backoff,
            )
            or []
        )
        out.extend(_remote_row(s) for s in subs if s is not None)
        if len(subs) < page_size:
            break
    return out


def team_rank(
    api: Any, slug: str, team: str, backoff: Backoff, page_size: int = 100, max_pages: int = 20
) -> tuple[int | None, int]:
    """(the team's 1-based place on the public leaderboard or None, how many teams were read)."""
    seen, token = 0, ""
    with api.build_kaggle_client() as client:
        for _ in range(max_pages):
            request = _request(
                ApiGetLeaderboardRequest, competition_name=slug, page_size=page_size, page_token=token or None
            )
            response = call(
                client.competitions.competition_api_client.get_leaderboard,
                request,
                what="reading the leaderboard",
                slug=slug,
                backoff=backoff,
            )
            for entry in response.submissions:
                seen += 1
                if entry.team_name == team:
                    return seen, seen
            token = response.next_page_token
            if not token:
                break
    return None, seen


def lb(cfg: Config) -> pd.DataFrame:
    """Sync the ledger with Kaggle, print CV vs public vs private and the team's rank, plot CV vs LB."""
    slug, sub_dir = kaggle_slug(cfg), Path(cfg.paths.submissions_dir)
    api, backoff = connect(), retry_policy()
    subs = list_submissions(api, slug, backoff)
    team = next((s["team_name"] for s in subs if s["team_name"]), "")
    rank, seen = team_rank(api, slug, team, backoff) if team else (None, 0)
    book = ledger.transact(
        paths.ledger_csv(cfg),
        lambda df: ledger.merge_remote(df, subs, slug, enrich=lambda s: ledger.local_provenance(s, sub_dir)),
    )
    view = book[book["competition"] == slug]
    metric = cfg.competition.metric
    console.print(
        ledger.render_table(view, higher_is_better(metric), f"{slug}: CV vs public vs private ({metric})")
    )
    if rank is not None:
        standing = f"'{team}' is #{rank}"
    else:
        standing = f"'{team}' is not in the top {seen}" if team else "no submissions yet"
    console.print(escape(f"public leaderboard: {standing}"))
    png = sub_dir / "cv_vs_lb.png"
    if ledger.plot_cv_vs_lb(view, png, f"{slug}: CV vs leaderboard ({metric})", higher_is_better(metric)):
        console.print(escape(f"wrote {png}"))
    return view
