"""`kpipe runs`: one table of every run under runs/, read from the files the runs wrote.

Thin shell over kpipe.eval.runs_table: find the run folders, read each, read the ledger, print the
table (sorted with --sort), and write it as CSV with --csv.
Usage: ``kpipe runs --sort cv --csv runs.csv``
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kpipe import paths
from kpipe.console import console, safe
from kpipe.errors import KpipeError
from kpipe.eval import runs_table
from kpipe.io import write_csv
from kpipe.kaggle import ledger


def table(runs_dir: str | Path, ledger_csv: str | Path, names: list[str] | None = None) -> pd.DataFrame:
    """The runs table of every run under runs_dir (or only those named)."""
    folders = paths.run_folders(runs_dir)
    if names:
        by_name = {r.name: r for r in folders}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise KpipeError(
                f"{runs_dir}: no run folder named {', '.join(unknown)} "
                f"(runs there: {', '.join(by_name) or 'none'})."
            )
        folders = [by_name[n] for n in names]
    records = [runs_table.load_run(r) for r in folders]
    return runs_table.build_table(records, ledger.read(ledger_csv))


def run(
    runs_dir: str | Path,
    ledger_csv: str | Path,
    sort: str | None = None,
    csv: str | Path | None = None,
    names: list[str] | None = None,
    reverse: bool = False,
) -> pd.DataFrame:
    df = runs_table.sort_table(table(runs_dir, ledger_csv, names), sort, reverse)
    if df.empty:
        console.print(f"no runs under {safe(runs_dir)} yet: `kpipe train` writes one per experiment.")
        return df
    console.print(runs_table.render(df, title=f"runs under {safe(runs_dir)}"))
    if csv is not None:
        write_csv(csv, df)
        console.print(f"wrote {safe(csv)}")
    return df
