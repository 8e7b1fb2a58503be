"""`kpipe sweep`: train every combination of a grid of config values, each as its own named run.

A grid axis is an override whose value lists alternatives with `|` (quote it for the shell):
``'model.name=resnet18|resnet34'``; plain ``key=value`` overrides apply to every run. A comma is
not a separator because list values use it (``train.folds=0,1``). ``--grid FILE`` reads axes
from YAML (``{model.name: [resnet18, resnet34], train.folds: [[0, 1], [0]]}``). Each run is named
``<exp>__key=value__...`` from its grid values only, made safe as a folder name. A run whose
cv.json says complete is skipped; any other is trained with resume=True, so a killed sweep
continues where it stopped. A grid with more than --max-runs runs needs --yes. With several GPUs
visible, the runs left to train go one per GPU at a time, each its own `kpipe train` process
(launch.run_per_gpu, as --fold-per-gpu does with folds; output in runs/<name>/train.log); on one GPU
or a CPU they train one after another in this process. It ends with the `kpipe runs` table of the
sweep's runs.
Usage: ``kpipe sweep -c configs/exp/demo.yaml --comp demo 'model.name=resnet10t|resnet18' 'train.optimizer=sgd|adamw'``
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import yaml

from kpipe import paths
from kpipe.config import Config, load_config
from kpipe.console import console, safe
from kpipe.errors import KpipeError

AXIS_SEP = "|"
DEFAULT_MAX_RUNS = 8
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(fixed overrides, grid axes {key: [value text, ...]}) from the command line's key=value items."""
    fixed: list[str] = []
    axes: dict[str, list[str]] = {}
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and AXIS_SEP in value:
            values = [v.strip() for v in value.split(AXIS_SEP)]
            if any(not v for v in values) or key.strip() in axes:
                raise KpipeError(
                    f"sweep: bad grid axis '{text}': expected key=a|b|c with no empty value, each key once."
                )
            axes[key.strip()] = values
        else:
            fixed.append(text)
    return fixed, axes


def _value_text(v: Any) -> str:
    """A YAML value as override text (parsed back by the config loader as the same value)."""
    return v if isinstance(v, str) else json.dumps(v)


def read_grid(path: Path) -> dict[str, list[str]]:
    """Axes from a YAML file: a mapping of dotted key -> list of values."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise KpipeError(f"{path}: cannot read the grid ({e}).") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) and v for v in raw.values()):
        raise KpipeError(
            f"{path}: a grid is a mapping of key -> non-empty list of values, "
            "e.g. {model.name: [resnet18, resnet34]}."
        )
    return {str(k): [_value_text(v) for v in values] for k, values in raw.items()}


def combinations(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the axes' values, in the order they were given (last axis fastest)."""
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(axes[k] for k in keys))]


def run_name(exp: str, combo: dict[str, str]) -> str:
    """`<exp>__key=value__...`, every character a folder name could trip on replaced by `_`."""

    def safe_part(text: str) -> str:
        return _UNSAFE.sub("_", text).strip("._")

    return "__".join(
        [safe_part(exp) or "sweep", *(f"{safe_part(k)}={safe_part(v)}" for k, v in combo.items())]
    )


def is_finished(run: paths.RunDir, folds: list[int] | None = None) -> bool:
    """cv.json covers every fold the run asked for: all of them, or `folds` (its train.folds)."""
    if not run.cv.is_file():
        return False
    try:
        cv = json.loads(run.cv.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False  # a cv.json cut short: train again (resume) rewrites it
    if cv.get("complete"):
        return True
    done = {int(k) for k in cv.get("per_fold", {})}
    return folds is not None and set(folds) <= done


def run(
    exp: str | None,
    comp: str | None,
    overrides: list[str],
    grid_file: Path | None = None,
    yes: bool = False,
    max_runs: int = DEFAULT_MAX_RUNS,
    gpus: int | None = None,
) -> list[str]:
    """Train the grid; return the run names. gpus: how many to spread runs over (default: every visible one)."""
    fixed, axes = split_overrides(overrides)
    if grid_file is not None:
        for key, values in read_grid(grid_file).items():
            if key in axes:
                raise KpipeError(f"sweep: {key} is a grid axis both in {grid_file} and on the command line.")
            axes[key] = values
    if not axes:
        raise KpipeError("sweep: no grid axis. Give one as key=a|b (quoted), or --grid FILE.")
    combos = combinations(axes)
    if len(combos) > max_runs and not yes:
        raise KpipeError(
            f"sweep: the grid has {len(combos)} runs, more than --max-runs {max_runs}. "
            "Add --yes to train them all, or shrink the grid."
        )
    base = load_config(exp, comp, fixed)
    names = [run_name(base.name, c) for c in combos]
    if len(set(names)) != len(names):
        raise KpipeError(
            "sweep: two grid values give the same run name once made folder-safe; rename a value."
        )
    from kpipe import launch  # torch: only loaded when something is trained
    from kpipe.stages import runs, train

    todo: list[tuple[Config, list[str]]] = []
    for i, (combo, name) in enumerate(zip(combos, names, strict=True), 1):
        run_overrides = [*fixed, *(f"{k}={v}" for k, v in combo.items()), f"name={name}"]
        cfg = load_config(exp, comp, run_overrides)
        if is_finished(paths.run_dir(cfg), cfg.train.folds):
            console.print(f"sweep {i}/{len(combos)}: {safe(name)} finished earlier, skipped")
        else:
            todo.append((cfg, run_overrides))
    gpus = launch.gpu_count() if gpus is None else gpus
    if gpus > 1 and len(todo) > 1:
        jobs = [(cfg.name, train_args(exp, comp, ov), paths.run_dir(cfg).log) for cfg, ov in todo]
        failed = launch.run_per_gpu(jobs, gpus)
        if failed:
            raise KpipeError(
                f"sweep: {len(failed)} run(s) failed: {', '.join(failed)}. See runs/<name>/train.log; "
                "the same sweep command resumes them (finished runs are skipped)."
            )
    else:
        for i, (cfg, _) in enumerate(todo, 1):
            console.print(f"[bold]sweep {i}/{len(todo)}[/]: {safe(cfg.name)}")
            train.run(cfg, resume=True)
    runs.run(base.paths.runs_dir, paths.ledger_csv(base), sort="cv", names=names)
    return names


def train_args(exp: str | None, comp: str | None, overrides: list[str]) -> list[str]:
    """`kpipe train` arguments that train one sweep run (resuming it) in a process of its own."""
    return [
        "train",
        *(["-c", exp] if exp else []),
        *(["--comp", comp] if comp else []),
        *overrides,
        "--resume",
    ]
