"""The `kpipe` command: one subcommand per stage, each `stage.run(load_config(...))`.

Stage modules are imported inside their handler so `kpipe --help` stays instant and a
stage's heavy imports (torch, kaggle) load only when it runs.
Usage: ``kpipe train -c configs/exp/resnet50.yaml --comp demo train.lr=3e-4``
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from kpipe import paths
from kpipe.config import Config, PathsConfig, load_config
from kpipe.console import console, err_console, safe, setup_logging
from kpipe.errors import Interrupted, KpipeError

DEMO_EXP = "configs/exp/demo.yaml"
# kpipe.eval.blend.METHODS, spelled here so that `import kpipe.cli` never imports torch (a test keeps them equal)
ENSEMBLE_METHODS = ["weights", "hill_climb", "rank_mean"]


def resolve_comp(comp: str | None) -> str | None:
    """A competition given by name means configs/competition/<name>.yaml."""
    if comp is None or comp.endswith((".yaml", ".yml")) or Path(comp).is_file():
        return comp
    return f"configs/competition/{comp}.yaml"


def config_from(args: argparse.Namespace) -> Config:
    return load_config(args.exp, resolve_comp(args.comp), args.overrides)


def _config_args(
    p: argparse.ArgumentParser, exp_help: str = "experiment YAML (inherits configs/exp/base.yaml)"
) -> None:
    p.add_argument("-c", "--config", dest="exp", metavar="EXP.yaml", help=exp_help)
    p.add_argument(
        "--comp",
        metavar="NAME|FILE",
        help="competition: a name (configs/competition/<name>.yaml) or a YAML path",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides applied last, e.g. train.lr=3e-4 train.folds=0,2",
    )


# ------------------------------------------------------------------ handlers


def _demo_data(args: argparse.Namespace) -> int:
    from kpipe.stages import demo

    demo.run(args.data_root, force=args.force)
    return 0


def _demo_report(args: argparse.Namespace) -> int:
    from kpipe.stages import demo

    # The demo experiment on the demo competition, with the data folder the demo was written to.
    demo.report(load_config(DEMO_EXP, resolve_comp("demo"), [f"paths.data_root={args.data_root}"]))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from kpipe.stages import audit

    audit.run(
        config_from(args),
        threshold=args.threshold,
        min_similarity=args.min_similarity,
        workers=args.workers,
        max_pairs=args.max_pairs,
    )
    return 0


def _folds(args: argparse.Namespace) -> int:
    from kpipe.stages import folds

    folds.run(config_from(args))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from kpipe.stages import cache

    cache.run(config_from(args))
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.gpus or args.fold_per_gpu:
        from kpipe import launch

        if args.fold_per_gpu:
            return launch.fold_per_gpu(config_from(args), launch.strip_launch_flags(args.argv))
        return launch.torchrun(args.gpus, args.argv)
    from kpipe.stages import train

    if args.full:
        train.run_full(config_from(args))
        return 0
    train.run(config_from(args), resume=args.resume)
    return 0


def _relabel(args: argparse.Namespace) -> int:
    from kpipe.stages import relabel

    cfg, run_dir = config_from(args), args.run
    if args.sources and (run_dir or args.quick):
        raise KpipeError("--from blends the OOF of the runs it names; leave out --run and --quick.")
    if args.quick:  # no run yet: train a small CV model first, then read its OOF
        if run_dir is not None:
            raise KpipeError(
                "--quick trains its own run; leave out --run (or leave out --quick to use that run)."
            )
        from kpipe.stages import train  # torch: only loaded when a model is trained

        qcfg = relabel.quick_config(cfg)
        relabel.check_quick_run(cfg, qcfg)
        console.print(
            f"[bold]--quick[/]: training {safe(qcfg.model.name)} at {qcfg.data.img_size} px for "
            f"{qcfg.train.epochs} epochs on every fold -> {safe(paths.run_dir(qcfg).root)}"
        )
        train.run(qcfg, resume=True)
        run_dir = paths.run_dir(qcfg).root
    relabel.run(
        cfg,
        run_dir=run_dir,
        accept_above=args.accept_above,
        apply=args.apply,
        sources=args.sources,
        filter_by=args.filter,
    )
    return 0


def _review(args: argparse.Namespace) -> int:
    from kpipe.stages import review

    review.run(config_from(args), port=args.port)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from kpipe.stages import explain

    explain.run(config_from(args), fold=args.fold, images=args.images)
    return 0


def _infer(args: argparse.Namespace) -> int:
    from kpipe.stages import infer

    infer.run(config_from(args), runs=args.runs)
    return 0


def _oof_tta(args: argparse.Namespace) -> int:
    from kpipe.stages import oof_tta

    oof_tta.run(config_from(args), runs=args.runs)
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from kpipe.stages import ensemble

    ensemble.run(
        config_from(args), run_dirs=args.runs, out=args.out, include_tta=not args.no_tta, method=args.method
    )
    return 0


def _pseudo(args: argparse.Namespace) -> int:
    from kpipe.stages import pseudo

    pseudo.run(config_from(args), args.source, threshold=args.threshold, hard=args.hard, out=args.out)
    return 0


def _package(args: argparse.Namespace) -> int:
    from kpipe.stages import package

    overrides = args.overrides + (
        [f"package.bundle_deps={','.join(args.bundle_deps)}"] if args.bundle_deps else []
    )
    cfg = load_config(args.exp, resolve_comp(args.comp), overrides)
    package.run(cfg, runs=args.runs, upload=args.upload)
    return 0


def _kernel(args: argparse.Namespace) -> int:
    from kpipe.stages import kernel

    cfg = config_from(args)
    kernel.run(cfg)
    if args.dry_run:
        kernel.dry_run(cfg, rows=args.rows, hidden_rows=args.hidden_size, time_limit_min=args.time_limit_min)
    if args.push:
        kernel.push(cfg, wait=not args.no_wait)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from kpipe.kaggle import submission

    return submission.run_validate(config_from(args), Path(args.file))


def _kaggle_download(args: argparse.Namespace) -> int:
    from kpipe.stages import kaggle

    kaggle.download(config_from(args), force=args.force, file=args.file)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from kpipe.stages import kaggle

    if (
        args.kernel and args.file and "=" in args.file
    ):  # `submit --kernel X key=value`: an override, not a CSV
        args.overrides, args.file = [args.file, *args.overrides], None
    if args.kernel:
        if args.file:
            raise KpipeError(
                "give a CSV or --kernel OWNER/SLUG, not both (a code competition submits the notebook)."
            )
        kaggle.submit_kernel(
            config_from(args), args.kernel, args.version, args.message, wait=args.wait, force=args.force
        )
        return 0
    if not args.file:
        raise KpipeError(
            "nothing to submit: give a submission CSV, or --kernel OWNER/SLUG for a code competition."
        )
    kaggle.submit(config_from(args), Path(args.file), args.message, wait=args.wait, force=args.force)
    return 0


def _lb(args: argparse.Namespace) -> int:
    from kpipe.stages import kaggle

    kaggle.lb(config_from(args))
    return 0


def _runs(args: argparse.Namespace) -> int:
    from kpipe.stages import runs

    runs.run(
        args.runs_dir,
        paths.ledger_csv_in(args.submissions_dir),
        sort=args.sort,
        csv=args.csv,
        names=args.names or None,
        reverse=args.reverse,
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from kpipe.stages import compare

    compare.run(args.runs_dir, args.runs, baseline=args.baseline, name=args.name)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from kpipe.tools import sweep

    sweep.run(
        args.exp,
        resolve_comp(args.comp),
        args.overrides,
        grid_file=Path(args.grid) if args.grid else None,
        yes=args.yes,
        max_runs=args.max_runs,
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from kpipe.tools import bench

    if args.scale is not None:
        bench.run_scale(Path(args.out), args.scale, args.scale_factor, args.scale_size, args.scale_model)
        return 0
    bench.run(out_dir=Path(args.out), n_images=args.images, repeats=args.repeats, quick=args.quick)
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kpipe",
        description="A pipeline for Kaggle image-classification competitions: "
        "demo-data/kaggle download -> audit -> folds -> train -> relabel -> infer -> submit -> lb.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    p = add(
        "demo-data", _demo_data, "write the bundled demo competition (MNIST in Kaggle layout) to data/demo/"
    )
    p.add_argument("--data-root", default="data", help="folder that receives demo/ and demo_truth.csv")
    p.add_argument("--force", action="store_true", help="rebuild even if the demo is already there")

    p = add(
        "demo-report",
        _demo_report,
        "score the demo: CV before/after cleaning, relabel precision/recall, "
        "test accuracy (reads the demo's truth file)",
    )
    p.add_argument("--data-root", default="data", help="folder holding demo/ and demo_truth.csv")

    p = add("audit", _audit, "find unreadable files, odd images, duplicates and train/test leakage")
    _config_args(p)
    p.add_argument(
        "--threshold", type=int, default=6, help="perceptual-hash distance (of 64 bits) for near duplicates"
    )
    p.add_argument(
        "--min-similarity",
        type=float,
        default=0.97,
        help="thumbnail correlation a near duplicate must also reach",
    )
    p.add_argument("--workers", type=int, default=2, help="processes decoding images")
    p.add_argument(
        "--max-pairs", type=int, default=2_000_000, help="cap on listed pairs (groups stay complete)"
    )
    _config_args(add("folds", _folds, "write stratified (duplicate-grouped) K folds to folds/<comp>.csv"))

    _config_args(
        add("cache", _cache, "build the decode-once image cache of the training images (as data.cache=true)")
    )
    p = add("train", _train, "train the experiment's folds; writes runs/<exp>/")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from each fold's last.pt")
    p.add_argument(
        "--full",
        action="store_true",
        help="train one model on every usable row -> runs/<exp>_full/ (no OOF, no CV of its own); "
        "epochs: train.full_epochs or the mean best epoch of runs/<exp>",
    )
    p.add_argument("--gpus", type=int, default=0, help="launch DDP over N GPUs via torchrun (same command)")
    p.add_argument("--fold-per-gpu", action="store_true", help="train one fold per visible GPU, in parallel")

    p = add("relabel", _relabel, "suggest relabels from OOF predictions (confident learning); review; apply")
    _config_args(p)
    p.add_argument("--run", help="run folder whose oof.csv to use (default: runs/<exp>)")
    p.add_argument(
        "--from",
        dest="sources",
        nargs="+",
        default=None,
        metavar="RUN_OR_JSON",
        help="rank suspects on the blended OOF of these runs (all TTA views) or of an ensemble JSON",
    )
    p.add_argument(
        "--filter",
        default=None,
        metavar="FILTER",
        help="cleanlab's filter_by that picks the suspects (default low_self_confidence: as many as "
        "cleanlab estimates are wrong, lowest p(given) first; or prune_by_noise_rate, both, ...)",
    )
    p.add_argument(
        "--accept-above",
        type=float,
        default=None,
        metavar="SCORE",
        help="accept suggestions whose score is at least SCORE",
    )
    p.add_argument(
        "--apply", action="store_true", help="build the cleaned labels folds/train read from now on"
    )
    p.add_argument("--quick", action="store_true", help="no run yet: train a small CV model first to get OOF")

    p = add("review", _review, "decide relabels with a click: serve relabels.csv's suspects on 127.0.0.1")
    _config_args(p)
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one, printed)")

    p = add(
        "explain",
        _explain,
        "look inside a run: filters, feature maps, Grad-CAM, top losses -> runs/<exp>/explain/",
    )
    _config_args(p)
    p.add_argument(
        "--fold", type=int, default=None, help="which fold's model (default: the first trained fold)"
    )
    p.add_argument("--images", type=int, default=8, help="validation images per picture (default 8)")

    p = add("infer", _infer, "predict the test set (TTA, folds, runs) and write a validated submission")
    _config_args(p)
    p.add_argument(
        "--runs", nargs="+", default=None, help="run folders to ensemble (default: infer.runs or runs/<exp>)"
    )

    p = add("oof-tta", _oof_tta, "score every TTA view on each fold's own validation images")
    _config_args(p)
    p.add_argument("--runs", nargs="+", default=None, help="run folders (default: infer.runs or runs/<exp>)")

    p = add("ensemble", _ensemble, "fit blend weights over runs (and TTA views) on OOF")
    _config_args(p)
    p.add_argument("--runs", nargs="+", required=True, help="run folders to blend")
    p.add_argument("--out", default=None, help="weights JSON (default: runs/ensembles/<exp>.json)")
    p.add_argument("--no-tta", action="store_true", help="blend runs only, not their TTA views")
    p.add_argument(
        "--method",
        default="weights",
        choices=ENSEMBLE_METHODS,
        help="weights: fitted weights; hill_climb: Caruana selection; rank_mean: rank averaging",
    )

    p = add("pseudo", _pseudo, "pseudo-label test images from `kpipe infer`'s predictions (data.pseudo)")
    _config_args(p)
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="predictions folder of `kpipe infer` on a run or an ensemble (predictions/<name>)",
    )
    p.add_argument(
        "--threshold", type=float, default=0.9, help="keep rows whose top probability is at least this"
    )
    p.add_argument("--hard", action="store_true", help="one-hot labels instead of the soft probabilities")
    p.add_argument("--out", default=None, help="CSV to write (default: data/<comp>/pseudo/<name>.csv)")

    p = add(
        "package",
        _package,
        "the runs infer uses as a Kaggle dataset: safetensors weights, configs, "
        "a kpipe wheel, manifest -> package/<name>/",
    )
    _config_args(p)
    p.add_argument("--runs", nargs="+", default=None, help="run folders (default: infer.runs or runs/<exp>)")
    p.add_argument(
        "--upload", action="store_true", help="create (or version) the Kaggle dataset and wait until ready"
    )
    p.add_argument(
        "--bundle-deps",
        nargs="+",
        default=None,
        metavar="DIST",
        help="add wheels of these libraries (kpipe's version range) for an image that lacks them "
        "(package.bundle_deps)",
    )

    p = add(
        "kernel",
        _kernel,
        "render the internet-off inference notebook for a code competition -> kernels/<name>/",
    )
    _config_args(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run the notebook here in a simulated /kaggle tree, on the public test and a resized one",
    )
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        metavar="N",
        help="rows of the dry-run's second test (default: kernel.dry_run_rows, else 3x the public test)",
    )
    p.add_argument(
        "--hidden-size",
        type=int,
        default=None,
        metavar="N",
        help="rows of the hidden test to project the run time to (default: kernel.hidden_test_size)",
    )
    p.add_argument(
        "--time-limit-min",
        type=float,
        default=None,
        metavar="MIN",
        help="the competition's notebook time limit (default: kernel.time_limit_min)",
    )
    p.add_argument(
        "--push", action="store_true", help="push the notebook to Kaggle, wait for it, fetch its log"
    )
    p.add_argument("--no-wait", action="store_true", help="with --push: return once pushed")

    p = add("validate-submission", _validate, "check a submission CSV against sample_submission.csv")
    p.add_argument("file", help="submission CSV")
    _config_args(p)

    p = add("kaggle", _kaggle_download, "talk to Kaggle: `kpipe kaggle download --comp NAME`")
    p.add_argument("action", choices=["download"], help="download: the competition files into data/<comp>/")
    p.add_argument("--force", action="store_true", help="download again even if the files are there")
    p.add_argument("--file", default=None, help="download this one file only")
    _config_args(p)

    p = add(
        "submit",
        _submit,
        "validate, then submit a CSV (or a notebook: --kernel) to Kaggle and record it in "
        "submissions/ledger.csv",
    )
    p.add_argument("file", nargs="?", default=None, help="submission CSV")
    p.add_argument(
        "--kernel",
        default=None,
        metavar="OWNER/SLUG",
        help="code competition: submit this notebook's output (see `kpipe kernel --push`)",
    )
    p.add_argument(
        "--version", type=int, default=None, metavar="N", help="with --kernel: the notebook version"
    )
    p.add_argument(
        "-m",
        "--message",
        default=None,
        help="submission description (default: built from the runs and CV in the sidecar JSON)",
    )
    p.add_argument("--wait", action="store_true", help="poll until the score (or the error) arrives")
    p.add_argument("--force", action="store_true", help="submit even a byte-identical file again")
    _config_args(p)

    _config_args(add("lb", _lb, "sync the ledger with Kaggle; CV vs public/private table and plot"))

    p = add(
        "runs", _runs, "one table of every run under runs/: model, size, time, CV per fold, TTA, LB scores"
    )
    p.add_argument("names", nargs="*", metavar="RUN", help="only these runs (folder names under --runs-dir)")
    p.add_argument("--runs-dir", default=PathsConfig().runs_dir, help="folder holding the run folders")
    p.add_argument(
        "--submissions-dir",
        default=PathsConfig().submissions_dir,
        help="folder holding ledger.csv (public/private scores)",
    )
    p.add_argument(
        "--sort",
        default=None,
        metavar="COL",
        help="sort by a column (numbers largest first), e.g. cv, wall_s, img_per_s, params",
    )
    p.add_argument("--reverse", action="store_true", help="flip --sort (smallest first: log loss, time)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV")

    p = add("compare", _compare, "pictures of runs side by side: runs/compare/<name>/index.html")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder names under --runs-dir, or paths")
    p.add_argument(
        "--baseline",
        default=None,
        metavar="RUN",
        help="per-class F1 is shown minus this run's (default: the first run)",
    )
    p.add_argument("--name", default=None, help="report folder name (default: the run names joined by __)")
    p.add_argument("--runs-dir", default=PathsConfig().runs_dir, help="folder holding the run folders")

    p = add("sweep", _sweep, "train every combination of a grid ('key=a|b', quoted), one named run each")
    _config_args(p)
    p.add_argument("--grid", default=None, metavar="FILE", help="YAML grid: {key: [value, ...], ...}")
    p.add_argument("--yes", action="store_true", help="train a grid larger than --max-runs")
    p.add_argument("--max-runs", type=int, default=8, metavar="N", help="largest grid trained without --yes")

    p = add("bench", _bench, "measure loader, inference and training speed (writes bench/results.md)")
    p.add_argument("--out", default="bench", help="output folder")
    p.add_argument("--images", type=int, default=1000, help="synthetic JPEGs to generate")
    p.add_argument("--repeats", type=int, default=3, help="repetitions per measurement (median reported)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    p.add_argument(
        "--scale",
        type=int,
        default=None,
        metavar="N",
        help="instead: time audit, folds, cache and infer as subprocesses on N and 4N images",
    )
    p.add_argument(
        "--scale-factor", type=int, default=4, metavar="F", help="with --scale: the larger set is F x N"
    )
    p.add_argument(
        "--scale-size", type=int, default=224, metavar="PX", help="with --scale: cache and model input size"
    )
    p.add_argument(
        "--scale-model", default="resnet18", help="with --scale: the (random-weight) model infer runs"
    )
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, letting key=value overrides stand anywhere (argparse alone wants them before options)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"'{args.command}' takes no key=value overrides: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def retain_freed_memory() -> bool:
    """Linux/glibc: keep freed memory for reuse instead of handing it back to the system.

    glibc gives every block over 32 MB its own mmap and unmaps it on free, so each CPU forward and
    backward page-faults and zeroes its activations afresh: measured (kpipe bench, resnet18, batch
    32 at 224 px, 2 cores) as about 45 % of CPU inference time, and why a 2-view TTA forward cost
    2.2-2.6x one view. The price: the process keeps its peak memory until it exits.
    KPIPE_KEEP_FREED_MEMORY=0 leaves glibc's defaults. Returns whether the setting was applied.
    """
    if os.environ.get("KPIPE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): its allocator, its defaults
        return False
    # M_MMAP_MAX = 0: large blocks come from the heap too, so a freed one is reused, already mapped.
    # M_TRIM_THRESHOLD: never give the heap's free top back (it would be faulted in again next step).
    return bool(mallopt(-4, 0)) and bool(mallopt(-1, 2**31 - 1))


def _check_list_args(args: argparse.Namespace) -> None:
    """`--runs a b train.lr=1e-3`: argparse gives every word after --runs to --runs. A key=value there that is
    no folder was meant as an override: say so, instead of "no config.yaml" about a run that never was."""
    for flag, dest in (("--runs", "runs"), ("--from", "sources")):
        for word in getattr(args, dest, None) or []:
            if "=" in word and not Path(word).exists():
                raise KpipeError(
                    f"{flag} {word}: looks like a key=value override, but {flag} takes every word after it. "
                    f"Put overrides before {flag} (kpipe {args.command} ... {word} {flag} ...)."
                )


def main(argv: list[str] | None = None) -> int:
    retain_freed_memory()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    args.argv = argv  # launchers (--gpus, --fold-per-gpu) re-run this same command line
    setup_logging()
    try:
        _check_list_args(args)
        return int(args.fn(args) or 0)
    except KpipeError as e:
        err_console.print(f"[bold red]kpipe {args.command}:[/] {safe(e)}", soft_wrap=True)
        return 2
    except Interrupted as e:  # a stop request: last.pt is saved; the same command line resumes
        if e.main_process:
            again = shlex.join(a for a in argv if a != "--resume")
            resume = " --resume" if args.command == "train" else ""
            console.print(
                "[yellow]stopped: last.pt saved. Resume with:[/] " + safe(f"kpipe {again}{resume}"),
                soft_wrap=True,
            )
        return 128 + e.signum
    except KeyboardInterrupt:
        err_console.print(f"[yellow]kpipe {args.command}: interrupted[/]")
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        err_console.print(
            f"[bold red]kpipe {args.command}:[/] the disk is full{safe(where)}. Free some space, or "
            "point paths.* / data.cache_dir at another disk, then run the command again."
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
