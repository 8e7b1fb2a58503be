"""The Kaggle API plumbing kpipe's Kaggle commands stand on: credentials, connecting, retries.

Credentials are looked for where the kaggle client looks (never printed or recorded); the
client is imported only here and only after they are found, because `import kaggle`
authenticates at import time and exits the process when it can't. Calls retry 429/5xx and
dropped connections with bounded exponential backoff and turn 401/403 into messages that say
what to do.

Usage: ``api = connect(); call(api.competition_submit, ..., what="upload", slug=slug, backoff=retry_policy())``
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests

from kpipe.config import Config
from kpipe.console import err_console, safe
from kpipe.errors import KpipeError

T = TypeVar("T")
ENV_BACKOFF = "KPIPE_KAGGLE_BACKOFF"
ENV_POLL = "KPIPE_KAGGLE_POLL"
ENV_WAIT_TIMEOUT = "KPIPE_KAGGLE_WAIT_TIMEOUT"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
TOKEN_PAGE = "https://www.kaggle.com/settings/api"


class KaggleError(KpipeError):
    """A Kaggle API failure explained for the user; `status` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _UploadFailed(Exception):
    """The client's file upload failed before any submission was created: safe to retry."""


def kaggle_slug(cfg: Config) -> str:
    return cfg.competition.kaggle_slug or cfg.competition.name


# ------------------------------------------------------------------ credentials


def _kaggle_config_dir() -> Path:
    # The kaggle client's rule (KaggleApi.config_dir): $KAGGLE_CONFIG_DIR, else ~/.kaggle if it
    # exists, else (Linux) the XDG config folder.
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    home = Path(os.path.expanduser("~/.kaggle"))
    if home.exists() or not sys.platform.startswith("linux"):
        return home
    return Path(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")) / "kaggle"


def _read_kaggle_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # the client ignores a malformed file too; the help message names it
    return data if isinstance(data, dict) else {}


def credential_source() -> str | None:
    """Where the kaggle client will find credentials (names and paths only, never a secret), or None.

    Same places, same order as kaggle 2.2's authenticate(): an API token (KAGGLE_API_TOKEN or
    ~/.kaggle/access_token), a legacy key (kaggle.json, overridden by KAGGLE_USERNAME/KAGGLE_KEY),
    OAuth credentials from `kaggle auth login`.
    """
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "the KAGGLE_API_TOKEN environment variable"
    for name in ("access_token", "access_token.txt"):
        token_file = Path(os.path.expanduser("~/.kaggle")) / name
        if token_file.is_file() and token_file.read_text(encoding="utf-8", errors="replace").strip():
            return str(token_file)
    json_path = _kaggle_config_dir() / "kaggle.json"
    from_file = _read_kaggle_json(json_path)
    where = []
    for env, key in (("KAGGLE_USERNAME", "username"), ("KAGGLE_KEY", "key")):
        if os.environ.get(env):
            where.append(f"${env}")
        elif from_file.get(key):
            where.append(str(json_path))
    if len(where) == 2:
        return " and ".join(dict.fromkeys(where))
    oauth = Path(os.path.expanduser("~/.kaggle/credentials.json"))
    if oauth.is_file():
        return f"{oauth} (from `kaggle auth login`)"
    return None


def credentials_help() -> str:
    json_path = _kaggle_config_dir() / "kaggle.json"
    found = f" ({json_path} exists but has no 'username' and 'key')" if json_path.is_file() else ""
    return (
        "no Kaggle credentials found. Put them where the kaggle client looks, one of:\n"
        f'  - {json_path}{found}: {{"username": "...", "key": "..."}} from {TOKEN_PAGE} '
        '("Create Legacy API Key"); then chmod 600 it. $KAGGLE_CONFIG_DIR moves this folder.\n'
        "  - environment variables KAGGLE_USERNAME and KAGGLE_KEY\n"
        f"  - an API token from {TOKEN_PAGE} in $KAGGLE_API_TOKEN or in ~/.kaggle/access_token\n"
        "  - `kaggle auth login` (OAuth; stored in ~/.kaggle/credentials.json)"
    )


def connect() -> Any:
    """An authenticated KaggleApi, or a KpipeError that says where credentials go."""
    source = credential_source()
    if source is None:
        raise KpipeError(credentials_help())
    said = io.StringIO()
    # Importing kaggle authenticates at once and may print its own help; keep that off the
    # screen and show it only when the sign-in worked (e.g. its "key readable by others" warning).
    with contextlib.redirect_stdout(said):
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        # The client reads KAGGLE_API_ENVIRONMENT once, at import; honour its value now.
        local = os.environ.get("KAGGLE_API_ENVIRONMENT") == "LOCALHOST"
        api.args = [a for a in KaggleApi.args if a != "--local"] + (["--local"] if local else [])
        try:
            api.authenticate()
        except SystemExit:
            raise KpipeError(
                f"the kaggle client could not sign in with the credentials in {source} "
                f"(expired or revoked?). Create a new token at {TOKEN_PAGE} and put it there."
            ) from None
        except requests.RequestException as e:
            raise _explain(e, "signing in", "") from None
    if said.getvalue().strip():
        err_console.print(safe(said.getvalue().strip()), soft_wrap=True)
    return api


# ------------------------------------------------------------------ errors and retries


@dataclass(frozen=True)
class Backoff:
    """Exponential delays between attempts: first, first*factor, ... capped; `tries` attempts in all."""

    first: float
    factor: float = 2.0
    cap: float = 60.0
    tries: int = 6

    def delays(self) -> list[float]:
        return [min(self.cap, self.first * self.factor**i) for i in range(self.tries - 1)]


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise KpipeError(f"${name}={raw!r}: expected a number of seconds.") from None
    if value < 0:
        raise KpipeError(f"${name}={raw!r}: expected a number of seconds >= 0.")
    return value


def wait_settings() -> tuple[float, float]:
    """(first pause between status polls, give up after) in seconds: $KPIPE_KAGGLE_POLL, $KPIPE_KAGGLE_WAIT_TIMEOUT."""
    return _env_seconds(ENV_POLL, 10.0), _env_seconds(ENV_WAIT_TIMEOUT, 1800.0)


def retry_policy() -> Backoff:
    return Backoff(first=_env_seconds(ENV_BACKOFF, 2.0))


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return None if response is None else int(response.status_code)


# A query string that signs or authorises a request (GCS / S3 signed URLs, tokens): never shown or logged.
_QUERY = re.compile(r"\?[^\s'\"<>()]*")
_SECRET_KEY = re.compile(
    r"(?i)(?:^|[?&])(?:x-goog-[\w-]*|x-amz-[\w-]*|signature|sig|token|access_token|key|"
    r"googleaccessid|credential|policy)="
)


def redact(text: str) -> str:
    """`text` with the query string of every signed storage URL in it replaced by `?<redacted>`.

    A 403 from a download carries the signed URL it was sent to; that URL is a bearer credential
    for the file until it expires, and kpipe's messages end up in logs and bug reports.
    """
    return _QUERY.sub(lambda m: "?<redacted>" if _SECRET_KEY.search(m.group(0)) else m.group(0), text)


def _explain(e: BaseException, what: str, slug: str) -> KaggleError:
    status, detail = _status(e), redact(str(e))
    if status == 401:
        msg = (
            f"Kaggle rejected the credentials while {what} (401 Unauthorized). They come from "
            f"{credential_source() or 'nowhere'}; create a new token at {TOKEN_PAGE} and put it there."
        )
    elif status == 403:
        msg = (
            f"Kaggle refused {what} (403 Forbidden: {detail}). Most often the competition's rules "
            f"are not accepted yet: accept them on https://www.kaggle.com/competitions/{slug}/rules "
            "first, then run this again."
        )
    elif status == 404:
        msg = (
            f"Kaggle found nothing while {what} (404: {detail}). Is '{slug}' the competition's slug "
            "(the last part of its URL)? Set competition.kaggle_slug in the competition YAML."
        )
    elif status is None:
        msg = f"could not reach Kaggle while {what}: {detail}. Check the network and any proxy settings."
    else:
        msg = f"Kaggle answered {status} while {what}: {detail}"
    return KaggleError(msg, status)


def _transient(e: BaseException) -> bool:
    if isinstance(e, requests.HTTPError):
        return _status(e) in RETRY_STATUS
    return isinstance(
        e,
        (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _UploadFailed),
    )


def _retry_after(e: BaseException) -> float | None:
    response = getattr(e, "response", None)
    value = None if response is None else response.headers.get("Retry-After")
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: fall back to our own delay


def call(
    fn: Callable[..., T],
    *args: Any,
    what: str,
    slug: str,
    backoff: Backoff,
    recover: Callable[[], T | None] | None = None,
    **kwargs: Any,
) -> T:
    """fn(*args, **kwargs), retrying transient failures; other failures become a KaggleError.

    `recover` runs before each retry after a 5xx or a dropped connection, which may come after
    the server did the work (e.g. created the submission): a non-None answer is returned instead.
    """
    delays = backoff.delays()
    for attempt in range(len(delays) + 1):
        try:
            return fn(*args, **kwargs)
        except (requests.RequestException, _UploadFailed) as e:
            if not _transient(e) or attempt == len(delays):
                raise _explain(e, what, slug) from None
            delay = delays[attempt]
            hint = _retry_after(e)
            if hint is not None:  # the server's Retry-After, within our cap
                delay = min(backoff.cap, max(delay, hint))
            err_console.print(
                safe(
                    f"kaggle: {what} failed ({_status(e) or type(e).__name__}); "
                    f"retry {attempt + 1}/{len(delays)} in {delay:.1f} s"
                ),
                soft_wrap=True,
            )
            time.sleep(delay)
            if recover is not None and _status(e) != 429:
                found = recover()
                if found is not None:
                    return found
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ download
