"""The inference notebook on Kaggle: push it, wait for its run, fetch its log and output.

`kaggle kernels push` saves a new version and starts it; `kaggle kernels status` is polled until
the run completes or fails; `kaggle kernels output` brings back its files and log into
kernels/<name>.output/. A failed run is a KpipeError that quotes Kaggle's failure message and the end
of the log. The version number is what `kpipe submit --kernel OWNER/SLUG --version N` submits.
Usage: ``push(paths.kernel_dir(cfg), wait=True)``
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kpipe import paths
from kpipe.console import console, safe
from kpipe.errors import KpipeError
from kpipe.io import write_json
from kpipe.kaggle.api import KaggleError, call, connect, retry_policy, wait_settings

DONE = ("complete", "error", "cancel_requested", "cancel_acknowledged")


def kernel_ref(kd: paths.KernelDir) -> str:
    return str(json.loads(kd.metadata.read_text(encoding="utf-8"))["id"])


def push(kd: paths.KernelDir, wait: bool = True) -> dict[str, Any]:
    api, backoff = connect(), retry_policy()
    ref = kernel_ref(kd)
    response = call(api.kernels_push, str(kd.root), what=f"pushing notebook {ref}", slug=ref, backoff=backoff)
    if getattr(response, "error", None):
        raise KaggleError(f"Kaggle refused notebook {ref}: {response.error}")
    version = response.version_number
    console.print(f"pushed {safe(ref)} version {version}: {safe(response.url or '')}")
    result: dict[str, Any] = {"ref": ref, "version": version, "status": "pushed"}
    if wait:
        status, failure = wait_done(api, ref)
        result.update(status=status, failure=failure, files=fetch_output(api, ref, kd.output))
        write_json(kd.output / "push.json", result)
        if status != "complete":
            raise KpipeError(
                f"notebook {ref} version {version} ended {status}: {failure or 'no message'}. "
                f"Its log, in {kd.output}:\n  " + "\n  ".join(_log_tail(kd.output))
            )
        console.print(
            f"[bold green]{safe(ref)} version {version} complete[/]; output in {safe(kd.output)}. "
            f"Submit it: kpipe submit --kernel {safe(ref)} --version {version} --wait"
        )
    else:
        write_json(kd.output / "push.json", result)
    return result


def wait_done(api: Any, ref: str) -> tuple[str, str]:
    """Poll the run's status until it ends: (status, failure message)."""
    delay, timeout = wait_settings()
    deadline = time.monotonic() + timeout
    while True:
        got = call(
            api.kernels_status, ref, what=f"reading notebook {ref}'s status", slug=ref, backoff=retry_policy()
        )
        status = got.status.name.lower() if got.status is not None else ""
        if status in DONE:
            return status, got.failure_message or ""
        if time.monotonic() + delay > deadline:
            raise KaggleError(
                f"notebook {ref} is still {status or 'queued'} after {timeout:.0f} s; check "
                f"`kaggle kernels status {ref}`, then fetch its output with `kaggle kernels output`."
            )
        time.sleep(delay)
        delay = min(60.0, delay * 1.5)


def fetch_output(api: Any, ref: str, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    files, _ = call(
        api.kernels_output,
        ref,
        str(out),
        force=True,
        quiet=True,
        what=f"fetching notebook {ref}'s output",
        slug=ref,
        backoff=retry_policy(),
    )
    return [Path(f).name for f in files]


def _log_tail(out: Path, lines: int = 20) -> list[str]:
    logs = sorted(out.glob("*.log"))
    if not logs:
        return ["(no log came back)"]
    return logs[0].read_text(encoding="utf-8", errors="replace").strip().splitlines()[-lines:]
