"""The OOF table, one owner: `id, fold, label, p_<class>...`, one row per training image.

`kpipe train` writes it (runs/<exp>/oof.csv and each fold's), `kpipe infer` writes one per TTA view
(runs/<exp>/oof_tta/<view>.csv), and relabel, ensemble, reports and the review page read it. Probability
columns follow the class order of folds/<comp>.classes.json. Every reader goes through `read_oof`,
which checks the columns, repeated ids and non-finite probabilities and names the file.
Usage: ``write_oof(path, frame(ids, folds, labels, probs, classes)); oof = read_oof(path); oof.y``
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kpipe.errors import KpipeError, preview
from kpipe.io import read_csv_ids, write_csv
from kpipe.paths import RunDir

PREFIX = "p_"


def prob_columns(classes: Sequence[str]) -> list[str]:
    return [f"{PREFIX}{c}" for c in classes]


@dataclass(frozen=True)
class Oof:
    ids: list[str]
    labels: list[str]
    classes: list[str]
    probs: np.ndarray  # (N, K) in `classes` order
    folds: np.ndarray | None = None  # (N,) fold of each row, where the file has the column

    @property
    def y(self) -> np.ndarray:
        """Labels as class indices (`classes` order)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[label] for label in self.labels], dtype=np.int64)

    def frame(self) -> pd.DataFrame:
        return frame(self.ids, self.folds, self.labels, self.probs, self.classes)


def frame(
    ids: Sequence[str],
    folds: Sequence[int] | np.ndarray | int | None,
    labels: Sequence[str],
    probs: np.ndarray,
    classes: Sequence[str],
) -> pd.DataFrame:
    """The table as written: id, fold, label, p_<class>... (fold left out when None)."""
    head = pd.DataFrame({"id": list(ids)})
    if folds is not None:
        head["fold"] = np.broadcast_to(np.asarray(folds, dtype=np.int64), (len(head),))
    head["label"] = list(labels)
    return pd.concat([head, pd.DataFrame(np.asarray(probs), columns=prob_columns(classes))], axis=1)


def write_oof(path: Path, table: pd.DataFrame) -> None:
    write_csv(path, table)


def parse(df: pd.DataFrame, where: str) -> Oof:
    """An OOF table already in memory (e.g. concatenated fold files), checked like a file."""
    pcols = [c for c in df.columns if c.startswith(PREFIX)]
    missing = [c for c in ("id", "label") if c not in df.columns]
    if missing or not pcols:
        raise KpipeError(f"{where}: expected columns id, fold, label, p_<class>...; got {list(df.columns)}.")
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise KpipeError(f"{where}: ids appear more than once: {preview(dup.tolist())}.")
    probs = df[pcols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise KpipeError(
            f"{where}: non-numeric or empty probabilities in rows {preview(df['id'][bad].tolist())}."
        )
    classes = [c[len(PREFIX) :] for c in pcols]
    unknown = sorted(set(df["label"]) - set(classes))
    if unknown:
        raise KpipeError(f"{where}: labels with no p_<class> column: {preview(unknown)}.")
    folds = pd.to_numeric(df["fold"], errors="coerce").to_numpy() if "fold" in df.columns else None
    if folds is not None and np.isnan(folds).any():
        raise KpipeError(f"{where}: the fold column has non-numeric values.")
    return Oof(
        df["id"].tolist(),
        df["label"].astype(str).tolist(),
        classes,
        probs,
        None if folds is None else folds.astype(np.int64),
    )


def read_oof(path: Path, hint: str = "Train the run first (`kpipe train`).") -> Oof:
    """One OOF file, checked; `hint` says what to do when it is missing."""
    if not path.is_file():
        raise KpipeError(f"{path}: no out-of-fold predictions here. {hint}")
    return parse(read_csv_ids(path), str(path))


def align(ref: Oof, other: Oof, where: str, ref_where: str = "the first member") -> np.ndarray:
    """other's probabilities in ref's row and class order; errors say what differs (`ref_where` names ref)."""
    if set(other.classes) != set(ref.classes):
        raise KpipeError(
            f"{where}: classes differ from the first member's: only here {preview(sorted(set(other.classes) - set(ref.classes)))}, "
            f"missing here {preview(sorted(set(ref.classes) - set(other.classes)))}. Ensemble runs of the same competition and classes."
        )
    if set(other.ids) != set(ref.ids):
        extra, missing = sorted(set(other.ids) - set(ref.ids)), sorted(set(ref.ids) - set(other.ids))
        raise KpipeError(
            f"{where}: OOF ids differ from the first member's ({len(missing)} missing: {preview(missing)}; "
            f"{len(extra)} extra: {preview(extra)}). Members must be trained on the same folds file and folds."
        )
    pos = pd.Series(range(len(other.ids)), index=other.ids)[ref.ids].to_numpy()
    labels = np.asarray(other.labels, dtype=object)[pos]
    diff = [(i, a, b) for i, a, b in zip(ref.ids, ref.labels, labels, strict=True) if a != b]
    if diff:
        shown = "; ".join(f"{i!r}: {a!r} in {ref_where}, {b!r} here" for i, a, b in diff[:3])
        raise KpipeError(
            f"{where}: labels differ from {ref_where}'s for {len(diff)} of {len(ref.ids)} ids ({shown}"
            f"{'; ...' if len(diff) > 3 else ''}): the two runs were trained on different label sets (e.g. one "
            "before `kpipe relabel --apply`, one after). kpipe refuses to mix them: each member would be weighted "
            "and scored against labels it was not trained on. Re-train the older run on the current labels, "
            "or ensemble runs of one label set."
        )
    cols = [other.classes.index(c) for c in ref.classes]
    return other.probs[pos][:, cols]


@dataclass(frozen=True)
class Member:
    run: str
    view: str
    probs: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.run} [{self.view}]"


def load_members(run_dirs: list[str], include_tta: bool) -> tuple[Oof, list[Member]]:
    """Every member's OOF aligned to the first run's oof.csv: (reference, members)."""
    ref: Oof | None = None
    ref_where = ""
    members: list[Member] = []
    for run in run_dirs:
        rd = RunDir(Path(run))
        files = {"identity": rd.oof}
        if include_tta:
            # oof_tta/identity.csv, when present, replaces oof.csv: same code path as test inference.
            files.update({p.stem: p for p in sorted(rd.oof_tta_dir.glob("*.csv"))})
        for view, path in files.items():
            oof = read_oof(path, "Train the run (kpipe train) or drop it from the ensemble.")
            if ref is None:
                ref, ref_where = oof, str(path)
            members.append(Member(str(run), view, align(ref, oof, str(path), ref_where)))
    if ref is None:
        raise KpipeError("no runs to ensemble: pass run folders, e.g. kpipe ensemble runs/a runs/b.")
    return ref, members
