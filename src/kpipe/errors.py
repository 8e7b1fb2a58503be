"""User-facing errors and ingest problems.

A `KpipeError` is a user mistake or bad input: the CLI prints its message (what, which
file/row, what to do) and exits non-zero, with no traceback. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


class KpipeError(Exception):
    """An error the user can fix; its message says what is wrong and what to do."""


class Interrupted(Exception):
    """A stop request (SIGINT/SIGTERM) honoured: last.pt is saved. The CLI prints how to resume."""

    def __init__(self, signum: int, main_process: bool = True) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum, self.main_process = signum, main_process


def preview(items: Sequence[object], n: int = 5) -> str:
    """First few items and a count, for messages: "'a', 'b', 'c' (+12 more; 15 in all)"."""
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    if len(items) > n:
        shown += f" (+{len(items) - n} more; {len(items)} in all)"
    return shown


@dataclass(frozen=True)
class Problem:
    """One kind of problem found in input data, with the rows it touches.

    severity: "error" rows are left out of training; "warning" rows are kept (e.g. a label
    with stray whitespace, kept with the normalised label).
    """

    kind: str
    message: str
    hint: str
    severity: str = "error"
    ids: tuple[str, ...] = field(default_factory=tuple)

    def render(self) -> str:
        rows = f" Rows: {preview(self.ids)}." if self.ids else ""
        return f"[{self.severity}] {self.kind}: {self.message}.{rows} {self.hint}"
