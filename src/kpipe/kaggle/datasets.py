"""The package dataset on Kaggle: create it or add a version, then wait until Kaggle has it ready.

A notebook that starts while its dataset is still processing sees an old version or none, so
`kpipe package --upload` returns only once `kaggle datasets status` says ready (or fails with
Kaggle's answer). Calls go through kpipe.kaggle.api (credentials, retries with back-off).
Usage: ``upload(Path("package/b0-package"), "kpipe package 1a2b3c")``
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kpipe import paths
from kpipe.console import console, safe
from kpipe.errors import KpipeError
from kpipe.kaggle.api import KaggleError, call, connect, retry_policy, wait_settings


def dataset_id(root: Path) -> str:
    meta = paths.PackageDir(root).metadata
    if not meta.is_file():
        raise KpipeError(f"{meta}: missing. Write the package with `kpipe package` first.")
    return str(json.loads(meta.read_text(encoding="utf-8"))["id"])


def exists(api: Any, ref: str) -> bool:
    try:
        call(api.dataset_status, ref, what=f"reading dataset {ref}", slug=ref, backoff=retry_policy())
    except KaggleError as e:
        if e.status == 404:
            return False
        raise
    return True


def upload(root: Path, notes: str) -> dict[str, Any]:
    """Create the dataset (private) or version it from `root`; wait until ready. Returns {ref, status, version}."""
    api, backoff = connect(), retry_policy()
    ref = dataset_id(root)
    new = not exists(api, ref)
    what = f"{'creating' if new else 'versioning'} dataset {ref}"
    console.print(f"{what} from {safe(root)} ...")
    # a new dataset is private; a version carries its notes
    fn, args, kw = (
        (api.dataset_create_new, (str(root),), {"public": False})
        if new
        else (api.dataset_create_version, (str(root), notes), {})
    )
    response = call(
        fn,
        *args,
        **kw,
        quiet=True,
        convert_to_csv=False,
        dir_mode="zip",
        what=what,
        slug=ref,
        backoff=backoff,
    )
    if getattr(response, "error", None):
        raise KaggleError(f"Kaggle refused {what}: {response.error}")
    status = wait_ready(api, ref)
    console.print(f"[bold green]dataset {safe(ref)} is {status}[/] ({'created' if new else 'new version'})")
    return {"ref": ref, "status": status, "created": new}


def wait_ready(api: Any, ref: str) -> str:
    """Poll `kaggle datasets status` until ready; a failed dataset or the wait timeout is a KaggleError."""
    delay, timeout = wait_settings()
    deadline = time.monotonic() + timeout
    while True:
        status = str(
            call(
                api.dataset_status,
                ref,
                what=f"reading dataset {ref}'s status",
                slug=ref,
                backoff=retry_policy(),
            )
        ).lower()
        if status == "ready":
            return status
        if status in ("failed", "deleted"):
            raise KaggleError(
                f"Kaggle could not process dataset {ref} (status {status}); see its page "
                f"https://www.kaggle.com/datasets/{ref} and upload again."
            )
        if time.monotonic() + delay > deadline:
            raise KaggleError(
                f"dataset {ref} is still processing ({status}) after {timeout:.0f} s; a notebook "
                "started now would not see this version. Check `kaggle datasets status "
                f"{ref}` and push the notebook once it says ready."
            )
        time.sleep(delay)
        delay = min(60.0, delay * 1.5)
