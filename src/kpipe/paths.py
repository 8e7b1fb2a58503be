"""Every location kpipe reads or writes, derived in one place from the config.

Stages hand over through files (DESIGN.md); this module is the map of them. No other module joins
a folder and a file name for a hand-over file: it asks here, so a layout change is one edit and a
reader can see the whole tree on one screen:

    data/<comp>/                 raw competition files (data_dir), never modified
    data/<comp>/audit/           kpipe audit          data/<comp>/relabels.csv, review.html, labels_clean.csv
    folds/<comp>.csv             kpipe folds          folds/<comp>.classes.json, <comp>.excluded.csv
    runs/<exp>/                  kpipe train          (RunDir: config.yaml, fold<k>/, oof.csv, cv.json ...)
    runs/<exp>/explain/          kpipe explain        index.html and its PNGs
    runs/compare/<name>/         kpipe compare        (index.html and its PNGs)
    runs/ensembles/<exp>.json    kpipe ensemble       predictions/<name>/   kpipe infer
    submissions/<name>.csv       kpipe infer          submissions/<name>.json (sidecar), ledger.csv
    cache/<comp>/<px>/<split>.npy  decode-once image cache
    package/<name>/              kpipe package        (PackageDir: kpipe_package.json, runs/<tag>/, wheels/ ...)
    kernels/<name>/              kpipe kernel         (KernelDir: <name>.ipynb, kernel-metadata.json, dry_run/)

Usage: ``run = paths.run_dir(cfg); run.fold(0).best``; ``paths.folds_csv(cfg)``
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kpipe.config import Config

# ------------------------------------------------------------------ competition


def data_dir(cfg: Config) -> Path:
    """The competition's raw files (competition.data_dir, or <paths.data_root>/<name>)."""
    c = cfg.competition
    return Path(c.data_dir) if c.data_dir else Path(cfg.paths.data_root) / c.name


def work_dir(cfg: Config) -> Path:
    """kpipe's own files about the competition (audit/, relabels.csv, labels_clean.csv).

    The same folder as data_dir unless competition.data_dir points elsewhere (a read-only
    mount, say): raw files are only ever read.
    """
    return Path(cfg.paths.data_root) / cfg.competition.name


def audit_dir(cfg: Config) -> Path:
    return work_dir(cfg) / "audit"


def audit_table(cfg: Config, name: str) -> Path:
    """One of kpipe audit's tables (unreadable, groups, exact_duplicates, ...), as CSV."""
    return audit_dir(cfg) / f"{name}.csv"


def audit_summary(cfg: Config) -> Path:
    return audit_dir(cfg) / "summary.json"


def relabels_csv(cfg: Config) -> Path:
    return work_dir(cfg) / "relabels.csv"


def review_html(cfg: Config) -> Path:
    return work_dir(cfg) / "review.html"


def pseudo_csv(cfg: Config, name: str) -> Path:
    """`kpipe pseudo`'s labels for test images (data.pseudo); its provenance in the .json beside it."""
    return work_dir(cfg) / "pseudo" / f"{name}.csv"


def clean_labels_csv(cfg: Config) -> Path:
    return work_dir(cfg) / "labels_clean.csv"


def clean_labels_source(cfg: Config) -> Path:
    """Beside labels_clean.csv: the fingerprint of the training data it was computed from."""
    return work_dir(cfg) / "labels_clean.source.json"


def lock_file(path: Path) -> Path:
    """The lock beside a file that several writers change in place (relabels.csv.lock)."""
    return path.with_name(path.name + ".lock")


# ------------------------------------------------------------------ folds


def folds_csv(cfg: Config) -> Path:
    return Path(cfg.paths.folds_dir) / f"{cfg.competition.name}.csv"


def classes_json(cfg: Config) -> Path:
    """The class order of every probability column (written by `kpipe folds`)."""
    return Path(cfg.paths.folds_dir) / f"{cfg.competition.name}.classes.json"


def excluded_csv(cfg: Config) -> Path:
    return Path(cfg.paths.folds_dir) / f"{cfg.competition.name}.excluded.csv"


def cache_file(cfg: Config, img_size: int, split: str) -> Path:
    return Path(cfg.data.cache_dir) / cfg.competition.name / str(img_size) / f"{split}.npy"


# ------------------------------------------------------------------ runs


@dataclass(frozen=True)
class FoldDir:
    root: Path

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def oof(self) -> Path:
        return self.root / "oof.csv"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def teacher_json(self) -> Path:
        """train.teacher: which teacher checkpoint gave this fold's soft targets."""
        return self.root / "teacher.json"

    @property
    def weights_json(self) -> Path:
        """Which weights best.pt holds (raw / ema / swa) and each candidate's validation score."""
        return self.root / "weights.json"


@dataclass(frozen=True)
class RunDir:
    """One training run's folder, runs/<exp>/ (or any folder a user names with --runs)."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def folds_sha256(self) -> Path:
        return self.root / "folds.sha256"

    @property
    def oof(self) -> Path:
        return self.root / "oof.csv"

    @property
    def cv(self) -> Path:
        return self.root / "cv.json"

    @property
    def log(self) -> Path:
        """The run's output when a launcher trains it in its own process (kpipe sweep, one run per GPU)."""
        return self.root / "train.log"

    @property
    def run_json(self) -> Path:
        """Facts of the run that the config does not hold: parameter counts, wall time per fold."""
        return self.root / "run.json"

    @property
    def curves_png(self) -> Path:
        return self.root / "curves.png"

    @property
    def confusion_png(self) -> Path:
        return self.root / "confusion.png"

    @property
    def per_class_csv(self) -> Path:
        return self.root / "per_class.csv"

    @property
    def per_class_png(self) -> Path:
        return self.root / "per_class.png"

    @property
    def pseudo_json(self) -> Path:
        """Which pseudo-label file (data.pseudo) the run trained on: path, sha256, rows, weight."""
        return self.root / "pseudo.json"

    @property
    def oof_tta_dir(self) -> Path:
        return self.root / "oof_tta"

    def oof_tta(self, view: str) -> Path:
        return self.oof_tta_dir / f"{view}.csv"

    @property
    def explain_dir(self) -> Path:
        """`kpipe explain`'s report: index.html and its PNGs."""
        return self.root / "explain"

    @property
    def explain_html(self) -> Path:
        return self.explain_dir / "index.html"

    def fold(self, k: int) -> FoldDir:
        return FoldDir(self.root / f"fold{k}")

    @property
    def full(self) -> FoldDir:
        """The full-data model of a `kpipe train --full` run (runs/<exp>_full/full/): no validation, no OOF."""
        return FoldDir(self.root / "full")

    def fold_dirs(self) -> list[FoldDir]:
        return [FoldDir(p) for p in sorted(self.root.glob("fold*")) if p.is_dir()]


def run_dir(cfg: Config) -> RunDir:
    return RunDir(Path(cfg.paths.runs_dir) / cfg.name)


FULL_SUFFIX = "_full"


def full_run_dir(cfg: Config) -> RunDir:
    """`kpipe train --full`'s run: runs/<exp>_full/, beside the CV run runs/<exp>/ whose epochs it takes."""
    return RunDir(Path(cfg.paths.runs_dir) / f"{cfg.name}{FULL_SUFFIX}")


# Folders under runs_dir that hold no training run.
NOT_RUNS = ("ensembles", "compare")


def run_folders(runs_dir: str | Path) -> list[RunDir]:
    """Every training run under runs_dir (a folder with a config.yaml), by name."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return [
        RunDir(p)
        for p in sorted(root.iterdir())
        if p.is_dir() and p.name not in NOT_RUNS and (p / "config.yaml").is_file()
    ]


def compare_dir(runs_dir: str | Path, name: str) -> Path:
    """`kpipe compare`'s report: runs/compare/<name>/index.html and its PNGs."""
    return Path(runs_dir) / "compare" / name


def ensemble_json(cfg: Config) -> Path:
    return Path(cfg.paths.runs_dir) / "ensembles" / f"{cfg.name}.json"


# ------------------------------------------------------------------ predictions and submissions


def predictions_dir(cfg: Config, name: str) -> Path:
    return Path(cfg.paths.predictions_dir) / name


def submission_csv(cfg: Config, name: str) -> Path:
    return Path(cfg.paths.submissions_dir) / f"{name}.csv"


def sidecar(submission: Path) -> Path:
    """The JSON beside a submission CSV: which runs, views and CV made it."""
    return submission.with_suffix(".json")


def ledger_csv(cfg: Config) -> Path:
    return ledger_csv_in(cfg.paths.submissions_dir)


def ledger_csv_in(submissions_dir: str | Path) -> Path:
    return Path(submissions_dir) / "ledger.csv"


# ------------------------------------------------------------------ code competitions

# A packaged run folder (package/<name>/runs/<tag>/) holds config.yaml and, per fold, weights as
# safetensors plus a JSON of the rest of the checkpoint (classes, data_config, config).
PACKAGE_SPEC = "kpipe_package.json"


FULL_FOLD = -1  # the fold number of a full-data model (full/best.pt, `kpipe train --full`)


def package_model_name(k: int) -> str:
    """fold<k>, or full for the full-data model: a packaged run's file stem for fold k's model."""
    return "full" if k == FULL_FOLD else f"fold{k}"


def package_weights(run_root: Path, k: int) -> Path:
    return run_root / f"{package_model_name(k)}.safetensors"


def package_fold_json(run_root: Path, k: int) -> Path:
    return run_root / f"{package_model_name(k)}.json"


@dataclass(frozen=True)
class PackageDir:
    """`kpipe package`'s folder: exactly what `kpipe infer` needs, uploaded as one Kaggle dataset."""

    root: Path

    @property
    def spec(self) -> Path:
        """Runs, views, weights, classes and prior: what infer.package reads instead of infer.runs."""
        return self.root / PACKAGE_SPEC

    @property
    def config(self) -> Path:
        """The resolved config the package was made with (the notebook's `kpipe infer -c`)."""
        return self.root / "config.yaml"

    @property
    def classes(self) -> Path:
        return self.root / "classes.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metadata(self) -> Path:
        """Kaggle's dataset-metadata.json (title, id, licenses)."""
        return self.root / "dataset-metadata.json"

    @property
    def wheels(self) -> Path:
        return self.root / "wheels"

    @property
    def check_dir(self) -> Path:
        """Validation images for the notebook's agreement checks (infer.precision / infer.runtime)."""
        return self.root / "check"

    @property
    def check_csv(self) -> Path:
        """check/check.csv: file (a name inside check/), fold (the fold model that checks with it)."""
        return self.check_dir / "check.csv"

    def run(self, tag: str) -> Path:
        return self.root / "runs" / tag


def package_dir(cfg: Config) -> PackageDir:
    return PackageDir(Path(cfg.paths.packages_dir) / package_name(cfg))


def package_name(cfg: Config) -> str:
    return cfg.package.name or f"{cfg.name}-package"


@dataclass(frozen=True)
class KernelDir:
    """`kpipe kernel`'s folder: the notebook and its kernel-metadata.json, pushed as they are."""

    root: Path

    @property
    def notebook(self) -> Path:
        return self.root / f"{self.root.name}.ipynb"

    @property
    def metadata(self) -> Path:
        return self.root / "kernel-metadata.json"

    @property
    def dry_run(self) -> Path:
        """Dry-run reports (dry_run.json) and the submissions each dry-run wrote."""
        return self.root.parent / f"{self.root.name}.dry_run"

    @property
    def output(self) -> Path:
        """What `kpipe kernel --push` fetched back: the log and submission.csv of the pushed version."""
        return self.root.parent / f"{self.root.name}.output"


def kernel_dir(cfg: Config) -> KernelDir:
    return KernelDir(Path(cfg.paths.kernels_dir) / kernel_name(cfg))


def kernel_name(cfg: Config) -> str:
    return cfg.kernel.name or f"{cfg.name}-infer"
