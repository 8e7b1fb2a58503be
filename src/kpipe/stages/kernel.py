"""`kpipe kernel`: the inference notebook of a code competition, rendered, dry-run here, pushed to Kaggle.

`run` reads package/<name>/ (written by `kpipe package`) and writes kernels/<name>/<name>.ipynb
(kpipe.kaggle.notebook) and kernel-metadata.json (internet off, the package dataset and the
competition as sources, GPU as kernel.enable_gpu says). `dry_run` executes the notebook's code cells
as one script in a subprocess, in a simulated /kaggle tree under a temporary folder ($KAGGLE_ROOT):
input/ holds copies of the competition's test images + sample_submission and of the package, made
read-only; working/ is scratch; the wheel goes into a folder of its own, not this environment; proxies
point nowhere so nothing can be downloaded. It runs on the public test and on a test of another size
(the public images repeated to N rows with a matching sample_submission), fits wall time = overhead +
rows x per-image time over the two, and projects it to the hidden test's size against the time limit.
`push` sends the notebook with the kaggle client, waits for it and fetches its log and output.
Usage: ``kpipe kernel -c configs/exp/b0.yaml --comp demo --dry-run --hidden-size 20000``
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from kpipe import paths
from kpipe.config import Config
from kpipe.console import console, safe
from kpipe.data import ingest
from kpipe.errors import KpipeError
from kpipe.io import read_csv_ids, write_csv, write_json, write_text
from kpipe.kaggle import notebook
from kpipe.kaggle.api import kaggle_slug
from kpipe.kaggle.package import kaggle_slug_of, read_spec, source_root

DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: any download attempt fails at once


def kernel_metadata(cfg: Config, dataset_id: str) -> dict[str, Any]:
    """Kaggle's kernel-metadata.json for `kaggle kernels push -p kernels/<name>`."""
    owner = dataset_id.split("/")[0]
    name = paths.kernel_name(cfg)
    slug = kaggle_slug_of(name, "kernel.name")
    return {
        "id": f"{owner}/{slug}",
        "title": slug,
        "code_file": f"{name}.ipynb",
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": cfg.kernel.enable_gpu,
        "enable_tpu": False,
        "enable_internet": False,
        "dataset_sources": [dataset_id],
        "competition_sources": [kaggle_slug(cfg)],
        "kernel_sources": [],
        "model_sources": [],
    }


def notebook_spec(cfg: Config) -> notebook.NotebookSpec:
    pkg = paths.package_dir(cfg)
    spec = read_spec(pkg.root)
    deps = tomllib.loads((source_root() / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "dependencies"
    ]
    return notebook.NotebookSpec(
        spec.name,
        kaggle_slug(cfg),
        Path(cfg.competition.sample_submission).name,
        cfg.competition.sub_id_col,
        notebook.requirements(deps),
    )


def run(cfg: Config) -> paths.KernelDir:
    """Write kernels/<name>/: the notebook and kernel-metadata.json, from package/<name>/."""
    pkg = paths.package_dir(cfg)
    if not pkg.spec.is_file() or not pkg.metadata.is_file():
        raise KpipeError(
            f"{pkg.root}: no package yet. Write it first: kpipe package -c <exp> --comp "
            f"{cfg.competition.name}"
        )
    dataset_id = json.loads(pkg.metadata.read_text(encoding="utf-8"))["id"]
    kd = paths.kernel_dir(cfg)
    write_text(kd.notebook, notebook.dumps(notebook.render(notebook_spec(cfg))))
    write_json(kd.metadata, kernel_metadata(cfg, dataset_id))
    console.print(
        f"[bold green]wrote {safe(kd.notebook)}[/] and kernel-metadata.json (internet off; sources: "
        f"{safe(dataset_id)}, {safe(kaggle_slug(cfg))}; {'GPU' if cfg.kernel.enable_gpu else 'CPU'})"
    )
    return kd


# ------------------------------------------------------------------ dry-run


def repeat_test(
    test: pd.DataFrame, sample: pd.DataFrame, id_col: str, rows: int
) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """A sample_submission of `rows` rows cycling the readable public test images under new ids, and the
    (source file, new file name) pairs to copy. New ids and files share a 'r<i>_' prefix, so an id still
    names its file the way the competition's ids do."""
    found = test[test["found"].to_numpy(bool)]
    if found.empty:
        raise KpipeError("the public test has no readable image to repeat for the resized dry-run.")
    by_id = sample.set_index(id_col, drop=False)
    out, files = [], []
    for i in range(rows):
        row = found.iloc[i % len(found)]
        new = by_id.loc[row["id"]].copy()
        new[id_col] = f"r{i:06d}_{row['id']}"
        out.append(new)
        files.append((Path(row["path"]), f"r{i:06d}_{Path(row['path']).name}"))
    return pd.DataFrame(out).reset_index(drop=True), files


def _read_only(root: Path, on: bool) -> None:
    for p in [*root.rglob("*"), root]:
        if p.is_dir():
            p.chmod(
                stat.S_IRUSR | stat.S_IXUSR | (stat.S_IWUSR if not on else 0) | stat.S_IRGRP | stat.S_IXGRP
            )
        else:
            p.chmod(stat.S_IRUSR | (stat.S_IWUSR if not on else 0) | stat.S_IRGRP)


def _sim_tree(cfg: Config, top: Path, rows: int | None) -> tuple[Path, int]:
    """top/kaggle with input/<comp> (test + sample_submission, maybe resized), input/<package>, working/."""
    kaggle = top / "kaggle"
    comp = kaggle / "input" / kaggle_slug(cfg)
    test_dir = comp / cfg.competition.test_dir
    test_dir.mkdir(parents=True)
    sample = ingest.read_sample_submission(cfg)
    test = ingest.load_test(cfg)
    if rows is None:
        for src in test.loc[test["found"].to_numpy(bool), "path"]:
            dest = test_dir / Path(src).relative_to(paths.data_dir(cfg) / cfg.competition.test_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    else:
        sample, files = repeat_test(test, sample, ingest.sample_id_col(cfg, sample), rows)
        for src, name in files:
            shutil.copy2(src, test_dir / name)
    write_csv(comp / Path(cfg.competition.sample_submission).name, sample)
    # Kaggle mounts a dataset under its slug
    shutil.copytree(
        paths.package_dir(cfg).root,
        kaggle / "input" / kaggle_slug_of(paths.package_name(cfg), "package.name"),
    )
    (kaggle / "working").mkdir()
    _read_only(kaggle / "input", True)
    return kaggle, len(sample)


def _run_case(cfg: Config, script: str, rows: int | None, out: Path, timeout_s: float) -> dict[str, Any]:
    """One dry-run: the notebook's script in a fresh simulated tree; keeps its log and submission.csv in `out`."""
    top = Path(tempfile.mkdtemp(prefix="kpipe-dry-run-"))
    try:
        kaggle, n = _sim_tree(cfg, top, rows)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KAGGLE_ROOT")}
        env.update(
            KAGGLE_ROOT=str(kaggle),
            KPIPE_PIP_TARGET=str(top / "site"),
            PIP_NO_INDEX="1",
            HTTP_PROXY=DEAD_PROXY,
            HTTPS_PROXY=DEAD_PROXY,
            http_proxy=DEAD_PROXY,
            https_proxy=DEAD_PROXY,
            NO_PROXY="",
            no_proxy="",
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-c", script],
                cwd=kaggle / "working",
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise KpipeError(
                f"dry-run on {n} rows ran past {timeout_s:.0f} s: Kaggle would stop it too "
                "('Notebook Timeout')."
            ) from None
        wall = time.perf_counter() - start
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "log.txt", done.stdout + done.stderr)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
            raise KpipeError(
                f"the notebook failed in the dry-run on {n} rows (exit {done.returncode}); log in "
                f"{out / 'log.txt'}, its end:\n  " + "\n  ".join(tail)
            )
        shutil.copy2(kaggle / "working" / "submission.csv", out / "submission.csv")
        shutil.copy2(kaggle / "working" / "predictions" / "submission" / "probs.csv", out / "probs.csv")
        return {"rows": n, "wall_s": round(wall, 3), "s_per_image": round(wall / n, 5), "dir": str(out)}
    finally:
        if (top / "kaggle" / "input").exists():
            _read_only(top / "kaggle" / "input", False)
        shutil.rmtree(top, ignore_errors=True)


def project(cases: list[dict[str, Any]], hidden_rows: int) -> tuple[float, float, float]:
    """(overhead s, s per image, projected s at hidden_rows): a line through the two dry-runs."""
    (n1, t1), (n2, t2) = [(c["rows"], c["wall_s"]) for c in cases[:2]]
    per = max((t2 - t1) / (n2 - n1), 0.0) if n1 != n2 else t2 / n2
    overhead = max(t1 - per * n1, 0.0)
    return overhead, per, overhead + per * hidden_rows


def dry_run(
    cfg: Config, rows: int | None = None, hidden_rows: int | None = None, time_limit_min: float | None = None
) -> dict[str, Any]:
    """Run the rendered notebook on the public test and on a test of `rows` rows; write and print the timing."""
    kd = paths.kernel_dir(cfg)
    if not kd.notebook.is_file():
        raise KpipeError(f"{kd.notebook}: not rendered yet; run `kpipe kernel` first.")
    script = notebook.as_script(json.loads(kd.notebook.read_text(encoding="utf-8")))
    limit_s = 60 * (time_limit_min or cfg.kernel.time_limit_min)
    write_text(kd.dry_run / "notebook.py", script)  # exactly what each dry-run executes
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        console.print(
            "[yellow]running as root: the simulated /kaggle/input is chmod read-only, but root can write "
            "anyway, so a notebook writing there would not fail here as it does on Kaggle.",
            soft_wrap=True,
        )
    public = _run_case(cfg, script, None, kd.dry_run / "public", limit_s)
    rows = rows or cfg.kernel.dry_run_rows or 3 * public["rows"]
    if rows == public["rows"]:
        raise KpipeError(f"--rows {rows}: the second dry-run needs a test size other than the public {rows}.")
    resized = _run_case(cfg, script, rows, kd.dry_run / f"rows{rows}", limit_s)
    cases = [public, resized]
    hidden = hidden_rows or cfg.kernel.hidden_test_size or max(c["rows"] for c in cases)
    overhead, per, projected = project(cases, hidden)
    report = {
        "cases": cases,
        "overhead_s": round(overhead, 3),
        "s_per_image": round(per, 6),
        "hidden_rows": hidden,
        "projected_s": round(projected, 1),
        "time_limit_s": limit_s,
        "fits": projected <= limit_s,
        "same_as_infer": _same_as_infer(cfg, kd.dry_run / "public"),
    }
    write_json(kd.dry_run / "dry_run.json", report)
    _print(report)
    if not report["fits"]:
        raise KpipeError(
            f"projected {projected / 60:.1f} min for {hidden} hidden-test rows, over the "
            f"{limit_s / 60:.0f}-minute limit: Kaggle would stop it ('Notebook Timeout'). Use fewer folds, "
            f"TTA views or runs, a GPU (kernel.enable_gpu=true), or a larger infer.batch_size."
        )
    return report


def _same_as_infer(cfg: Config, out: Path) -> bool | None:
    """Whether the public dry-run's submission equals `kpipe infer`'s (None when infer has not written one)."""
    local = paths.submission_csv(cfg, cfg.infer.name or cfg.name)
    if not local.is_file():
        return None
    return read_csv_ids(local).equals(read_csv_ids(out / "submission.csv"))


def _print(report: dict[str, Any]) -> None:
    table = Table(title="dry-run of the notebook (simulated /kaggle, input read-only, no network)")
    for col in ("test rows", "wall s", "s / image"):
        table.add_column(col, justify="right")
    for c in report["cases"]:
        table.add_row(str(c["rows"]), f"{c['wall_s']:.1f}", f"{c['s_per_image']:.4f}")
    console.print(table)
    same = {
        True: "identical to `kpipe infer`'s",
        False: "[red]DIFFERS from `kpipe infer`'s[/]",
        None: "(no `kpipe infer` submission to compare)",
    }[report["same_as_infer"]]
    console.print(f"public-test submission: {same}")
    colour = "green" if report["fits"] else "red"
    console.print(
        f"[{colour}]projection: {report['overhead_s']:.1f} s overhead + {report['s_per_image'] * 1000:.2f} ms "
        f"x {report['hidden_rows']} rows = {report['projected_s'] / 60:.1f} min of the "
        f"{report['time_limit_s'] / 60:.0f}-minute limit[/]"
    )


# ------------------------------------------------------------------ push


def push(cfg: Config, wait: bool = True) -> dict[str, Any]:
    """`kaggle kernels push` of kernels/<name>/, then (wait) poll until done and fetch its log and output."""
    from kpipe.kaggle import kernels

    kd = paths.kernel_dir(cfg)
    if not kd.metadata.is_file():
        raise KpipeError(f"{kd.metadata}: not rendered yet; run `kpipe kernel` first.")
    return kernels.push(kd, wait=wait)
