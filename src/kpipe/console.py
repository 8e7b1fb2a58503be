"""kpipe's one voice: the console every module prints through, and the logging set up once by the CLI.

Stages print tables and progress on `console` (stdout); warnings and errors go through `warn` / `error`
(errors on stderr); library modules log with `logging.getLogger(__name__)` and the CLI routes those records to
rich's handler (`setup_logging`), so a cache build or a weights load is never silently dropped.
User-provided text (labels, ids, file names, CSV cells) is data: `safe` escapes rich markup and strips
control characters before it is rendered.
Usage: ``from kpipe.console import console, warn, safe; console.print(f"wrote {safe(path)}")``
"""

from __future__ import annotations

import logging
import re

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from kpipe.errors import Problem

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

# C0/C1 control characters (ESC starts terminal escape sequences) except tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: object) -> str:
    """User text as inert data for rich: markup escaped, control characters shown as '?'."""
    return escape(plain(text))


def plain(text: object) -> str:
    """User text for plain print() or markup=False output: control characters (terminal escapes) shown as '?'."""
    return _CONTROL.sub("?", str(text))


def warn(message: str) -> None:
    """A warning the user should see (yellow). `message` is rich markup: escape user text with safe()."""
    console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def error(message: str) -> None:
    err_console.print(message, soft_wrap=True)


def print_problems(problems: list[Problem]) -> None:
    """Ingest problems, one line each: errors red (rows left out), warnings yellow (rows kept)."""
    for p in problems:
        style = "red" if p.severity == "error" else "yellow"
        console.print(plain(p.render()), style=style, markup=False, soft_wrap=True)


def setup_logging(level: int = logging.INFO) -> None:
    """Route every `logging` record (kpipe's and the libraries') through rich on stderr. Called by the CLI."""
    root = logging.getLogger()
    if any(isinstance(h, RichHandler) for h in root.handlers):
        return
    handler = RichHandler(
        console=err_console, show_time=False, show_path=False, markup=False, rich_tracebacks=False
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries: warnings only
    logging.getLogger("kpipe").setLevel(level)
