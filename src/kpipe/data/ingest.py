"""Competition ingest: which training images carry which label, which test images to predict.

Train labels come from a CSV (id and label columns; an id names its file with or without the
extension) or from class folders (ImageFolder layout: the folder is the label, the id is
"<class>/<file>"). Test ids come from sample_submission.csv, in its order. Problems (missing
files, duplicate ids, stray whitespace in labels, sample ids without an image, empty classes)
are reported as `Problem`s, never tracebacks; unusable train rows are left out and listed.
Nothing under the competition's data folder is ever modified.

Usage: ``ing = load_train(cfg); test = load_test(cfg); classes = load_classes(cfg)``
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kpipe import paths
from kpipe.config import Config
from kpipe.errors import KpipeError, Problem
from kpipe.io import read_csv_ids, write_json

OUTSIDE = "id outside the image folder"  # the reason ingest gives for an id that leaves its folder
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


@dataclass
class Ingest:
    """Usable train rows (id, label, path[, group]), the problems found, and the rows left out."""

    df: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    excluded: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["id", "path", "reason"]))
    classes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ pure helpers


def sort_classes(labels: list[str] | set[str]) -> list[str]:
    """The class order every stage uses: numeric order when all labels are integers, else text order."""
    labels = sorted(set(labels))
    if labels and all(re.fullmatch(r"-?\d+", s) for s in labels):
        return sorted(labels, key=int)
    return labels


def index_folder(folder: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Map file names and stems in `folder` to paths, scanning the folder once (not one stat per id)."""
    by_name: dict[str, str] = {}
    by_stem: dict[str, list[str]] = defaultdict(list)
    with os.scandir(folder) as it:
        for entry in it:
            if entry.is_file():
                by_name[entry.name] = entry.path
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in IMAGE_EXTS:
                    by_stem[stem].append(entry.path)
    return by_name, by_stem


def leaves_folder(image_id: str) -> bool:
    """True for an id that would name a file outside its image folder when joined to it: absolute
    ("/etc/x", "C:\\x", "\\\\host\\x"), a ".." part ("../x", "a/../../x", "..\\x"), or a NUL byte."""
    parts = re.split(r"[\\/]", image_id)
    return (
        os.path.isabs(image_id)
        or image_id.startswith("\\")
        or bool(re.match(r"[A-Za-z]:[\\/]", image_id))
        or ".." in parts
        or "\0" in image_id
    )


def resolve_file(
    image_id: str, folder: Path, by_name: dict[str, str], by_stem: dict[str, list[str]], image_ext: str | None
) -> str | None:
    """The file an id names: exact name, id + configured extension, or id + a unique image extension.
    None when there is none, or when the id would leave `folder` (see leaves_folder: such ids are never joined)."""
    if leaves_folder(image_id):
        return None
    if image_ext:
        name = image_id if image_id.endswith(image_ext) else image_id + image_ext
        return by_name.get(name) or _nested(folder, name)
    if image_id in by_name:
        return by_name[image_id]
    hits = by_stem.get(image_id, [])
    if len(hits) == 1:
        return hits[0]
    return _nested(folder, image_id)


def _nested(folder: Path, rel: str) -> str | None:
    # Ids like "sub/abc.jpg" point below the folder; the flat index does not see them.
    if "/" in rel:
        p = folder / rel
        return str(p) if p.is_file() else None
    return None


def normalise_labels(df: pd.DataFrame, label_col: str) -> tuple[pd.Series, list[Problem]]:
    """Strip stray whitespace from labels (a warning: the row is kept with the stripped label)."""
    raw = df[label_col].astype(str)
    clean = raw.str.strip()
    problems = []
    changed = df.loc[raw != clean, "id"].tolist()
    if changed:
        problems.append(
            Problem(
                "label whitespace",
                f"{len(changed)} labels have leading/trailing whitespace; kept with the whitespace removed",
                "Nothing to do unless the spaces were meant to make separate classes.",
                "warning",
                tuple(changed),
            )
        )
    return clean, problems


def dedupe_ids(df: pd.DataFrame) -> tuple[pd.DataFrame, list[Problem], pd.DataFrame]:
    """Duplicate ids: one copy kept when all copies agree on the label, all dropped when they disagree."""
    dup_mask = df["id"].duplicated(keep=False)
    if not dup_mask.any():
        return df, [], df.iloc[0:0][["id"]].assign(reason=[])
    dups = df[dup_mask]
    n_labels = dups.groupby("id")["label"].nunique()
    conflicting = set(n_labels[n_labels > 1].index)
    agreeing = set(n_labels[n_labels == 1].index)
    problems = []
    if agreeing:
        problems.append(
            Problem(
                "duplicate ids",
                f"{len(agreeing)} ids appear more than once with the same label; the first row of each is kept",
                "Remove the repeated rows from the CSV to silence this.",
                "warning",
                tuple(sorted(agreeing)),
            )
        )
    if conflicting:
        problems.append(
            Problem(
                "duplicate ids with different labels",
                f"{len(conflicting)} ids appear more than once with different labels; all their rows are left out",
                "Keep one row per id with the right label in the CSV.",
                "error",
                tuple(sorted(conflicting)),
            )
        )
    keep = df[~df["id"].isin(conflicting)].drop_duplicates("id", keep="first")
    dropped = pd.DataFrame({"id": sorted(conflicting), "reason": "duplicate id with different labels"})
    return keep, problems, dropped


# ------------------------------------------------------------------ train


def load_train(cfg: Config) -> Ingest:
    """Ingest the training labels of the competition (CSV or class folders) and check every row."""
    comp = cfg.competition
    train_dir = paths.data_dir(cfg) / comp.train_dir
    if not train_dir.is_dir():
        raise KpipeError(
            f"{train_dir}: training image folder not found. Set competition.train_dir in the competition "
            f"config (now '{comp.train_dir}', relative to {paths.data_dir(cfg)})."
        )
    ing = _ingest_csv(cfg, train_dir) if comp.layout == "csv" else _ingest_folders(train_dir)
    ing.classes = sort_classes(set(ing.df["label"]) | set(_labels_of_excluded(ing)))
    ing = _drop_unusable_files(ing)
    if ing.df.empty:
        reasons = ing.excluded["reason"].value_counts().to_dict() if len(ing.excluded) else {}
        raise KpipeError(
            f"{train_dir}: no usable training image ({len(ing.excluded)} rows left out: {reasons or 'none listed'}). "
            "Check competition.train_dir, train_csv and image_ext (e.g. '.jpg')."
        )
    _check_empty_classes(ing)
    return ing


def _labels_of_excluded(ing: Ingest) -> list[str]:
    return [x for x in ing.excluded.get("label", pd.Series(dtype=str)).tolist() if x]


def _ingest_csv(cfg: Config, train_dir: Path) -> Ingest:
    comp = cfg.competition
    csv_path = paths.data_dir(cfg) / comp.train_csv
    if not csv_path.is_file():
        raise KpipeError(f"{csv_path}: train CSV not found. Set competition.train_csv (or layout: folders).")
    raw = _read_table(csv_path, "train CSV")
    wanted = [comp.id_col, comp.label_col] + ([comp.group_col] if comp.group_col else [])
    missing = [c for c in wanted if c not in raw.columns]
    if missing:
        raise KpipeError(
            f"{csv_path}: no column {', '.join(repr(m) for m in missing)}; the file has {list(raw.columns)}. "
            "Set competition.id_col / label_col / group_col to the right names."
        )
    df = pd.DataFrame({"id": raw[comp.id_col], "label": raw[comp.label_col]})
    if comp.group_col:
        df["group"] = raw[comp.group_col]
    df["label"], problems = normalise_labels(df, "label")
    empty = df["label"] == ""
    excluded = [pd.DataFrame({"id": df.loc[empty, "id"], "label": "", "reason": "empty label"})]
    if empty.any():
        problems.append(
            Problem(
                "empty labels",
                f"{int(empty.sum())} rows have no label; left out",
                f"Fill the {comp.label_col} column.",
                "error",
                tuple(df.loc[empty, "id"]),
            )
        )
    df = df[~empty]
    df, dup_problems, dup_dropped = dedupe_ids(df)
    problems += dup_problems
    excluded.append(dup_dropped.assign(label=""))
    outside = df["id"].map(leaves_folder).astype(bool)
    if outside.any():
        problems.append(
            Problem(
                "ids outside the image folder",
                f"{int(outside.sum())} ids of {csv_path.name} are absolute paths or contain '..', so they would name "
                f"files outside {train_dir}; refused and left out",
                f"Ids must name files inside {comp.train_dir}/ (e.g. 'abc' or 'sub/abc.jpg'). Fix or remove the rows.",
                "error",
                tuple(df.loc[outside, "id"]),
            )
        )
        excluded.append(df.loc[outside, ["id", "label"]].assign(reason=OUTSIDE))
        df = df[~outside]
    by_name, by_stem = index_folder(train_dir)
    df = df.assign(path=[resolve_file(i, train_dir, by_name, by_stem, comp.image_ext) for i in df["id"]])
    lost = df["path"].isna()
    if lost.any():
        problems.append(
            Problem(
                "missing files",
                f"{int(lost.sum())} ids of {csv_path.name} have no image in {train_dir}; left out",
                "Check competition.train_dir and competition.image_ext (e.g. '.jpg'), or remove the rows.",
                "error",
                tuple(df.loc[lost, "id"]),
            )
        )
        excluded.append(df.loc[lost, ["id", "label"]].assign(reason="file not found"))
    return Ingest(df[~lost].reset_index(drop=True), problems, _concat(excluded))


def _read_table(path: Path, what: str) -> pd.DataFrame:
    """A competition CSV as text columns, or a KpipeError saying why it cannot be read."""
    try:
        return read_csv_ids(path)
    except pd.errors.EmptyDataError:
        raise KpipeError(f"{path}: the {what} is empty (not even a header row).") from None
    except UnicodeDecodeError as e:
        raise KpipeError(
            f"{path}: the {what} is not UTF-8 text ({e.reason} at byte {e.start}). Re-save it as UTF-8."
        ) from None
    except pd.errors.ParserError as e:
        raise KpipeError(f"{path}: the {what} is not a well-formed CSV ({e}).") from None


def _ingest_folders(train_dir: Path) -> Ingest:
    rows, stray, empty = [], [], []
    for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        files = sorted(f for f in class_dir.iterdir() if f.is_file())
        images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
        stray += [f"{class_dir.name}/{f.name}" for f in files if f.suffix.lower() not in IMAGE_EXTS]
        if not images:
            empty.append(class_dir.name)
        label = class_dir.name.strip()
        rows += [(f"{class_dir.name}/{f.name}", label, str(f)) for f in images]
    stray += [f.name for f in train_dir.iterdir() if f.is_file()]
    df = pd.DataFrame(rows, columns=["id", "label", "path"])
    problems = []
    if df.empty:
        raise KpipeError(
            f"{train_dir}: no images in class folders (layout: folders expects {train_dir}/<class>/<image>). "
            "Check competition.train_dir, or use layout: csv."
        )
    if stray:
        problems.append(
            Problem(
                "not images",
                f"{len(stray)} files are not images or sit outside a class folder; ignored",
                "Move images into a class folder; other files can stay.",
                "warning",
                tuple(stray),
            )
        )
    ws = sorted({i.split("/")[0] for i in df["id"] if i.split("/")[0] != i.split("/")[0].strip()})
    if ws:
        problems.append(
            Problem(
                "label whitespace",
                f"{len(ws)} class folder names have leading/trailing whitespace; "
                "used with the whitespace removed",
                "Rename the folders to silence this.",
                "warning",
                tuple(ws),
            )
        )
    excluded = pd.DataFrame(
        {"id": [f"{c}/" for c in empty], "label": [c.strip() for c in empty], "reason": "empty class folder"}
    )
    return Ingest(df, problems, excluded)


def _drop_unusable_files(ing: Ingest) -> Ingest:
    """Zero-byte files are certain failures; leave them out here. Deeper checks are `kpipe audit`'s."""
    sizes = [os.path.getsize(p) for p in ing.df["path"]]
    zero = pd.Series(sizes, index=ing.df.index) == 0
    if zero.any():
        ids = tuple(ing.df.loc[zero, "id"])
        ing.problems.append(
            Problem(
                "zero-byte files",
                f"{len(ids)} training images are empty files; left out",
                "Re-download them, or ignore: they are excluded.",
                "error",
                ids,
            )
        )
        ing.excluded = _concat(
            [ing.excluded, ing.df.loc[zero, ["id", "label", "path"]].assign(reason="zero-byte file")]
        )
        ing.df = ing.df[~zero].reset_index(drop=True)
    return ing


def _check_empty_classes(ing: Ingest) -> None:
    counts = ing.df["label"].value_counts()
    empty = [c for c in ing.classes if counts.get(c, 0) == 0]
    if empty:
        ing.problems.append(
            Problem(
                "empty classes",
                f"{len(empty)} classes have no usable training image",
                "The model can never predict them; add images or check the folder/labels.",
                "warning",
                tuple(empty),
            )
        )


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    cols = ["id", "label", "path", "reason"]
    if not frames:
        return pd.DataFrame(columns=cols)
    return pd.concat(frames, ignore_index=True).reindex(columns=cols).fillna("")


# ------------------------------------------------------------------ fingerprint of the training data


def fingerprint(cfg: Config) -> str:
    """sha256 over the train CSV's bytes and the sorted list of training images with their sizes.

    What the audit's tables and labels_clean.csv were computed from: `kpipe folds` compares it with
    today's data, so files made for an older download are never applied to a new one. Sizes, not
    contents: cheap for 100,000 images, and a re-encoded or replaced image changes its size.
    """
    comp = cfg.competition
    h = hashlib.sha256()
    csv_path = paths.data_dir(cfg) / comp.train_csv
    if comp.layout == "csv" and csv_path.is_file():
        h.update(csv_path.read_bytes())
    train_dir = paths.data_dir(cfg) / comp.train_dir
    listing = []
    for root, _, names in os.walk(train_dir):
        for name in names:
            if name.lower().endswith(IMAGE_EXTS):
                f = Path(root) / name
                listing.append(f"{f.relative_to(train_dir).as_posix()}\t{f.stat().st_size}\n")
    for line in sorted(listing):
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def check_fingerprint(recorded: str, current: str, what: Path, rerun: str, alternative: str = "") -> None:
    """Refuse a kpipe file computed from other training data than today's (KpipeError naming the command)."""
    if recorded != current:
        raise KpipeError(
            f"{what} was computed from other training data (the train CSV or images changed since, "
            f"e.g. a new download). Re-run `{rerun}` to redo it for this data{alternative}."
        )


# ------------------------------------------------------------------ test and sample submission


def read_sample_submission(cfg: Config) -> pd.DataFrame:
    path = paths.data_dir(cfg) / cfg.competition.sample_submission
    if not path.is_file():
        raise KpipeError(f"{path}: sample submission not found. Set competition.sample_submission.")
    df = _read_table(path, "sample submission")
    if df.shape[1] < 2:
        raise KpipeError(
            f"{path}: expected an id column and at least one target column, got {list(df.columns)}."
        )
    if df.empty:
        raise KpipeError(
            f"{path}: the sample submission has a header but no rows, so there are no test ids to "
            "predict. Download the competition's data again (kpipe kaggle download) or fix the file."
        )
    return df


def sample_id_col(cfg: Config, sample: pd.DataFrame) -> str:
    col = cfg.competition.sub_id_col or sample.columns[0]
    if col not in sample.columns:
        raise KpipeError(
            f"{cfg.competition.sample_submission}: no id column '{col}' (columns: {list(sample.columns)}). "
            "Set competition.sub_id_col."
        )
    return col


def load_test(cfg: Config) -> pd.DataFrame:
    """Test ids in sample_submission order with their files; `found` is False where no file exists
    (`reason` "file not found") or the id would leave the test folder (reason OUTSIDE, empty path).

    Every id keeps its row: inference predicts the class prior for ids it cannot read.
    """
    sample = read_sample_submission(cfg)
    ids = sample[sample_id_col(cfg, sample)]
    test_dir = paths.data_dir(cfg) / cfg.competition.test_dir
    if not test_dir.is_dir():
        raise KpipeError(f"{test_dir}: test image folder not found. Set competition.test_dir.")
    by_name, by_stem = index_folder(test_dir)
    files = [resolve_file(i, test_dir, by_name, by_stem, cfg.competition.image_ext) for i in ids]
    found = [f is not None for f in files]
    outside = [leaves_folder(i) for i in ids]
    reason = [OUTSIDE if o else "" if f else "file not found" for f, o in zip(found, outside, strict=True)]
    # An id that leaves the folder is never joined to it: its path stays empty, so nothing reads it.
    files = [
        f if f is not None else "" if o else str(test_dir / i)
        for f, i, o in zip(files, ids, outside, strict=True)
    ]
    return pd.DataFrame({"id": ids.tolist(), "path": files, "found": found, "reason": reason})


def check_test(test: pd.DataFrame, cfg: Config) -> list[Problem]:
    outside = test["reason"] == OUTSIDE
    missing = tuple(test.loc[~test["found"] & ~outside, "id"])
    problems = []
    if outside.any():
        problems.append(
            Problem(
                "test ids outside the image folder",
                f"{int(outside.sum())} ids of {cfg.competition.sample_submission} are absolute paths or "
                f"contain '..'; refused (never read)",
                "They still get a submission row (the class prior). Check the sample submission.",
                "warning",
                tuple(test.loc[outside, "id"]),
            )
        )
    if missing:
        problems.append(
            Problem(
                "test ids without an image",
                f"{len(missing)} ids of {cfg.competition.sample_submission} have no file in "
                f"{cfg.competition.test_dir}/",
                "They still get a submission row (the class prior). Check competition.test_dir / image_ext.",
                "warning",
                missing,
            )
        )
    return problems


# ------------------------------------------------------------------ class list


def save_classes(cfg: Config, classes: list[str]) -> None:
    write_json(paths.classes_json(cfg), {"competition": cfg.competition.name, "classes": classes})


def load_classes(cfg: Config) -> list[str]:
    """The class order fixed by `kpipe folds`; every probability column follows it."""
    path = paths.classes_json(cfg)
    if not path.is_file():
        raise KpipeError(f"{path}: no class list yet. Run `kpipe folds --comp {cfg.competition.name}` first.")
    return list(json.loads(path.read_text(encoding="utf-8"))["classes"])
