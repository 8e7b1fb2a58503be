"""Submission files in exactly sample_submission's shape, and a validator that says what is wrong.

Two shapes are understood (competition.submission_format, "auto" tells them apart by the sample):
- "label": the sample has its id column and one target column; each row gets its class name
  (the train labels' text, so integer classes are written as the same digits);
- "proba": the sample has one column per class; each row gets the class probabilities, in the
  sample's column order.
Ids are text throughout and are matched byte for byte: no stripping, no unicode normalisation.
Usage: ``sub = make_submission(probs, ids, classes, sample, cfg.competition)``; ``kpipe validate-submission sub.csv``.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from kpipe.config import CompetitionConfig, Config
from kpipe.console import console, plain
from kpipe.data import ingest
from kpipe.errors import KpipeError, Problem, preview
from kpipe.io import read_csv_ids

PROBA_SUM_TOL = 1e-3
BOM = b"\xef\xbb\xbf"


def id_column(sample: pd.DataFrame, id_col: str | None = None) -> str:
    """competition.sub_id_col, or the sample's first column."""
    col = id_col or str(sample.columns[0])
    if col not in sample.columns:
        raise KpipeError(
            f"competition.sub_id_col '{col}' is not a column of sample_submission ({list(sample.columns)})."
        )
    return col


def detect_format(
    sample: pd.DataFrame, classes: list[str], fmt: str = "auto", id_col: str | None = None
) -> str:
    """'label' or 'proba' for this sample; KpipeError when the sample does not fit the format asked for."""
    rest = [c for c in sample.columns if c != id_column(sample, id_col)]
    is_label, is_proba = len(rest) == 1, set(rest) == set(classes) and len(rest) == len(classes)
    if fmt == "label" and not is_label:
        raise KpipeError(
            f"submission_format is 'label' but sample_submission has {len(rest)} columns besides the id "
            f"({preview(rest)}); a label submission has exactly one."
        )
    if fmt == "proba" and not is_proba:
        raise KpipeError(
            "submission_format is 'proba' but sample_submission's columns besides the id are not the classes: "
            f"not classes {preview(sorted(set(rest) - set(classes)))}; "
            f"classes without a column {preview(sorted(set(classes) - set(rest)))}."
        )
    if fmt in ("label", "proba"):
        return fmt
    if is_label:
        return "label"
    if is_proba:
        return "proba"
    raise KpipeError(
        f"cannot tell the submission format from sample_submission's columns {preview(list(sample.columns), 8)}: "
        "neither one target column nor one column per class. Set competition.submission_format "
        "(and competition.sub_id_col if the id is not the first column)."
    )


def _text(values: pd.Series) -> pd.Series:
    """Cells as text, empty for missing; ids and labels are compared as text."""
    return values.map(lambda v: v if isinstance(v, str) else ("" if pd.isna(v) else str(v)))


def _near_match_hint(bad: list[str], good: set[str]) -> str:
    """Say so when values differ from valid ones only by whitespace, case or unicode normalisation."""

    def norm(s: str) -> str:
        return unicodedata.normalize("NFC", s).strip().casefold()

    normed = {norm(g) for g in good}
    near = [b for b in bad if norm(b) in normed]
    return (
        f" {preview(near, 3)} differ only by spaces, case or unicode form; write them exactly."
        if near
        else ""
    )


def make_submission(
    probs: np.ndarray, ids: list[str], classes: list[str], sample: pd.DataFrame, comp_cfg: CompetitionConfig
) -> pd.DataFrame:
    """A DataFrame with sample's columns, its ids in its order, and labels or probabilities from `probs` (N, K)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(ids), len(classes)):
        raise ValueError(f"probs {probs.shape} does not match {len(ids)} ids x {len(classes)} classes")
    id_col = id_column(sample, comp_cfg.sub_id_col)
    if not sample[id_col].map(lambda v: isinstance(v, str)).all():
        raise ValueError("sample ids must be text: read sample_submission with kpipe.io.read_csv_ids")
    fmt = detect_format(sample, classes, comp_cfg.submission_format, id_col)
    pred = pd.Series(range(len(ids)), index=pd.Index([str(i) for i in ids]))
    if pred.index.has_duplicates:
        raise KpipeError(
            f"predictions repeat ids: {preview(pred.index[pred.index.duplicated()].unique().tolist())}."
        )
    want = sample[id_col].tolist()
    missing = [i for i in want if i not in pred.index]
    extra = sorted(set(pred.index) - set(want))
    if missing or extra:
        raise KpipeError(
            f"predicted ids do not match sample_submission's: {len(missing)} not predicted ({preview(missing)}), "
            f"{len(extra)} not in the sample ({preview(extra)}).{_near_match_hint(missing, set(pred.index))} "
            "Check competition.test_dir and image_ext against sample_submission."
        )
    p = probs[pred[want].to_numpy()]
    finite = np.isfinite(p).all(axis=1)
    if not finite.all():  # argmax would turn a NaN row into the first class without a word
        raise KpipeError(
            f"{int((~finite).sum())} of {len(want)} rows have probabilities that are not finite (NaN or inf): "
            f"{preview([want[i] for i in np.flatnonzero(~finite)])}. No submission written. A model produced them "
            "(training diverged?): find it in predictions/<name>/members/ and re-train or leave that run out."
        )
    out: dict[str, object] = {}
    for col in sample.columns:
        if col == id_col:
            out[col] = want
        elif fmt == "label":
            out[col] = [classes[k] for k in p.argmax(axis=1)]
        else:
            out[col] = p[:, classes.index(col)]
    return pd.DataFrame(out, columns=list(sample.columns))


# ------------------------------------------------------------------ validation


def _id_problems(sub_ids: pd.Series, sample_ids: pd.Series) -> list[Problem]:
    problems = []
    dup = sub_ids[sub_ids.duplicated()].unique().tolist()
    if dup:
        problems.append(
            Problem(
                "duplicate_ids",
                f"{len(dup)} ids appear more than once",
                "Write each id once.",
                ids=tuple(dup),
            )
        )
    want, have = set(sample_ids), set(sub_ids)
    missing = [i for i in sample_ids if i not in have]
    if missing:
        hint = "Predict every id of sample_submission." + _near_match_hint(missing, have)
        problems.append(
            Problem(
                "missing_ids", f"{len(missing)} sample_submission ids have no row", hint, ids=tuple(missing)
            )
        )
    extra = [i for i in sub_ids if i not in want]
    if extra:
        hint = "Write only sample_submission's ids, byte for byte." + _near_match_hint(extra, want)
        problems.append(
            Problem("extra_ids", f"{len(extra)} ids are not in sample_submission", hint, ids=tuple(extra))
        )
    if not problems and sub_ids.tolist() != sample_ids.tolist():
        first = next(a for a, b in zip(sub_ids, sample_ids, strict=True) if a != b)
        problems.append(
            Problem(
                "id_order",
                "rows are not in sample_submission's order",
                "Kaggle accepts this; write them in the sample's order to diff easily.",
                severity="warning",
                ids=(first,),
            )
        )
    return problems


def _value_problems(
    sub: pd.DataFrame, fmt: str, cols: list[str], id_col: str, classes: list[str]
) -> list[Problem]:
    problems = []
    ids = _text(sub[id_col])
    cells = sub[cols].apply(_text)
    empty = (cells == "").any(axis=1) | (ids == "")
    if empty.any():
        problems.append(
            Problem(
                "empty_values",
                f"{int(empty.sum())} rows have empty cells",
                "Fill every cell.",
                ids=tuple(ids[empty]),
            )
        )
    if fmt == "label":
        col = cols[0]
        bad = ~cells[col].isin(classes) & (cells[col] != "")
        if bad.any():
            values = cells[col][bad].unique().tolist()
            hint = f"Use one of the classes: {preview(classes, 8)}.{_near_match_hint(values, set(classes))}"
            problems.append(
                Problem(
                    "unknown_labels",
                    f"labels not among the classes: {preview(values)}",
                    hint,
                    ids=tuple(ids[bad]),
                )
            )
        return problems
    num = cells.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    non_num = (~np.isfinite(num) & (cells != "").to_numpy()).any(axis=1)
    if non_num.any():
        problems.append(
            Problem(
                "non_numeric",
                f"{int(non_num.sum())} rows have probabilities that are not finite numbers",
                "Write plain decimal numbers.",
                ids=tuple(ids[non_num]),
            )
        )
    ok = np.isfinite(num).all(axis=1)
    out_of_range = ok & ((num < 0) | (num > 1)).any(axis=1)
    if out_of_range.any():
        problems.append(
            Problem(
                "proba_range",
                f"{int(out_of_range.sum())} rows have probabilities outside [0, 1]",
                "Write softmax probabilities, not logits.",
                ids=tuple(ids[out_of_range]),
            )
        )
    off = ok & (np.abs(num.sum(axis=1) - 1) > PROBA_SUM_TOL)
    if off.any():
        problems.append(
            Problem(
                "proba_sum",
                f"{int(off.sum())} rows' probabilities do not sum to 1 (tolerance {PROBA_SUM_TOL})",
                "Renormalise each row (divide by its sum).",
                ids=tuple(ids[off]),
            )
        )
    return problems


def validate_submission(
    sub: pd.DataFrame, sample: pd.DataFrame, classes: list[str], id_col: str | None = None, fmt: str = "auto"
) -> list[Problem]:
    """Everything that would make Kaggle reject or misread `sub`, one Problem per kind, with example ids."""
    id_col = id_column(sample, id_col)
    fmt = detect_format(sample, classes, fmt, id_col)
    problems: list[Problem] = []
    if list(sub.columns) != list(sample.columns):
        problems.append(
            Problem(
                "columns",
                f"columns are {list(sub.columns)}; sample_submission has {list(sample.columns)}",
                "Write exactly sample_submission's columns, in its order.",
            )
        )
    if id_col not in sub.columns:
        return problems
    if len(sub) != len(sample):
        problems.append(
            Problem(
                "row_count",
                f"{len(sub)} rows; sample_submission has {len(sample)}",
                "Write one row per sample_submission id.",
            )
        )
    problems += _id_problems(_text(sub[id_col]), _text(sample[id_col]))
    cols = [c for c in sample.columns if c != id_col and c in sub.columns]
    if cols:
        problems += _value_problems(sub, fmt, cols, id_col, classes)
    return problems


# ------------------------------------------------------------------ files


def validate_file(path: str | Path, cfg: Config) -> list[Problem]:
    """Problems of a submission CSV on disk against the competition's sample_submission."""
    path = Path(path)
    if not path.is_file():
        raise KpipeError(f"{path}: no such submission file.")
    try:
        sub = read_csv_ids(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        return [
            Problem(
                "unreadable",
                f"{path} is not a readable UTF-8 CSV ({e})",
                "Write it with kpipe infer or pandas to_csv.",
            )
        ]
    c = cfg.competition
    sample, classes = ingest.read_sample_submission(cfg), ingest.load_classes(cfg)
    problems = validate_submission(sub, sample, classes, c.sub_id_col, c.submission_format)
    with open(path, "rb") as fh:
        if fh.read(3) == BOM:  # pandas skips it; some scorers read it into the first column's name
            problems.append(
                Problem(
                    "bom",
                    "the file starts with a UTF-8 byte-order mark",
                    "Save it as UTF-8 without BOM.",
                    severity="warning",
                )
            )
    return problems


def run_validate(cfg: Config, path: str | Path) -> int:
    """Print a submission's problems; exit code 0 when it has no errors (warnings allowed), else 1."""
    problems = validate_file(path, cfg)
    for p in problems:
        style = "red" if p.severity == "error" else "yellow"
        console.print(plain(p.render()), style=style, markup=False, highlight=False)
    errors = sum(p.severity == "error" for p in problems)
    if errors:
        console.print(
            f"{path}: {errors} problem(s); Kaggle would reject or misread this file.", style="bold red"
        )
        return 1
    console.print(f"{path}: OK, matches sample_submission.", style="green")
    return 0
