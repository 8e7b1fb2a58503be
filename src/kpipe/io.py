"""Atomic file writes, shared by every stage.

Every file kpipe writes goes to a temporary file in the same folder, is flushed and
fsync'ed, then renamed over the target: a reader (or a run killed half-way) sees the old
file or the new one, never a torn one.
Read-modify-write sequences that several processes may run at once (the ledger, a cache build
shared by DDP ranks) hold `exclusive(lock_file)`, an OS file lock that works on Linux, macOS
and Windows (the `filelock` package). A large write (an image cache, test predictions) first calls
`check_free_space`, so a full disk is a clear refusal up front, not a torn file hours later.
Usage: ``with atomic_path(out / "oof.csv") as tmp: df.to_csv(tmp)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from filelock import FileLock

from kpipe.errors import KpipeError


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it into place."""
    path = Path(path)
    _check_writer(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; outputs get the usual umask'd mode like any file
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created, left in place, always empty) until the block ends.

    Other processes wait for it; so does another thread of this process. The lock lives in its own
    file because an atomic replace swaps the locked file's inode, and a lock on the old one would not
    stop a process that opened the new one.
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_file):
        yield


def _check_writer(path: Path) -> None:
    """Under DDP only rank 0 writes: a write from another rank is a bug, so fail loudly."""
    tdist = sys.modules.get("torch.distributed")  # no torch import for processes that never use it
    if tdist is not None and tdist.is_available() and tdist.is_initialized() and tdist.get_rank() != 0:
        raise RuntimeError(f"rank {tdist.get_rank()} tried to write {path}; only rank 0 writes files")


def _fsync_dir(folder: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_csv(path: str | os.PathLike[str], df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_yaml(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def read_csv_ids(path: str | os.PathLike[str], **kwargs: Any) -> pd.DataFrame:
    """Read a CSV keeping every column as text, so ids like '007' or 'café 1' survive byte for byte."""
    return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", **kwargs)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_free_space(folder: str | os.PathLike[str], needed: int, what: str, setting: str) -> None:
    """Refuse (KpipeError) to write `needed` bytes into `folder` when its file system has less free.

    `setting` names the config key that moves or shrinks the write, so the message says what to do.
    The nearest existing parent is checked: the folder itself may not exist yet.
    """
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise KpipeError(
            f"{what} needs {human_bytes(needed)} in {folder}, but only {human_bytes(free)} is free "
            f"there. Free some space, or change {setting}."
        )
