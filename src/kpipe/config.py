"""The one typed config schema for kpipe, and the one place configs are loaded.

Two kinds of file fill it: a competition file (where its files are and what they mean;
its keys are the `competition` section) and an experiment file (model, data, train, folds,
infer sections) that may `inherit:` a base. `key=value` overrides on the command line come
last. Defaults live only here. Unknown keys, wrong types and malformed overrides fail with
one message naming the file, the key and a close match. The config is frozen after loading.

Usage: ``cfg = load_config("configs/exp/demo.yaml", "configs/competition/demo.yaml", ["train.lr=3e-4"])``
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from kpipe.errors import KpipeError
from kpipe.registry import AUG_OPS, AUG_PRESETS, METRICS, OPTIMIZERS, SCHEDULERS, Registry

CMDLINE = "command line"
_UNSAFE_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")


def plain_name(value: str) -> str:
    """A name kpipe turns into a file or folder name (runs/<name>/, submissions/<name>.csv): one path
    component, so no output lands outside its folder. ValueError (pydantic's message) otherwise."""
    if not value or value in (".", "..") or _UNSAFE_CHARS.search(value) or value != value.strip():
        raise ValueError(
            "must be a plain name such as 'b0_384' (one file-name part: no '/', '\\', '.' or '..' "
            "alone, control characters or surrounding spaces), because it becomes a file or folder name"
        )
    return value


def relative_name(value: str, what: str) -> str:
    """A relative path that stays inside its folder ('train/1.jpg' yes; '../x', '/x' no), or a KpipeError."""
    parts = re.split(r"[\\/]", value)
    if not value or value.startswith(("/", "\\")) or ".." in parts or re.search(r"[\x00-\x1f\x7f]", value):
        raise KpipeError(
            f"{what} {value!r}: must be a path inside the competition's data folder "
            "(no leading '/', no '..' parts, no control characters)."
        )
    return value


PlainName = Annotated[str, AfterValidator(plain_name)]


def Choice(registry: Registry) -> AfterValidator:  # noqa: N802 (reads as a type in the schema)
    """A string key whose value must name an entry of `registry` (errors list the entries)."""

    def check(value: str) -> str:
        try:
            return registry.check(value)
        except KpipeError as e:
            raise ValueError(str(e).removesuffix(".")) from None

    return AfterValidator(check)


def _check_aug(value: str | list[str]) -> str | list[str]:
    """data.aug: a preset name, or a list of distinct op names (kpipe.data.presets). 'hflip,rotate' (the
    command line's form) is a list too, and a single op name a one-op list."""
    presets, ops = AUG_PRESETS.names(), AUG_OPS.names()
    if isinstance(value, str):
        if value in presets:
            return value
        value = [a.strip() for a in value.split(",") if a.strip()]
    for name in value:
        if name not in ops:
            close = difflib.get_close_matches(name, [*presets, *ops], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(
                f"unknown augmentation '{name}'{hint}: data.aug is a preset ({', '.join(presets)}) "
                f"or a list of ops ({', '.join(ops)})"
            )
    if len(set(value)) != len(value):
        raise ValueError(f"data.aug lists an op twice: {value}")
    return value


class Section(BaseModel):
    """Base of every section: unknown keys rejected, values frozen after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _split_comma_lists(cls, data: Any) -> Any:
        # `train.folds=0,2` arrives as the string "0,2"; list-typed keys accept that form.
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if field is None or not _is_list_type(field.annotation) or _accepts_str(field.annotation):
                continue  # a key that takes a string as well as a list (data.aug) splits it itself
            if isinstance(value, str):
                out[key] = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = [value]  # `train.folds=0` arrives as the number 0
        return out


def _accepts_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))


def _is_list_type(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_is_list_type(a) for a in typing.get_args(tp))
    return origin is list


class CompetitionConfig(Section):
    """Where a competition's files are and what they mean."""

    name: PlainName
    data_dir: str | None = None  # default: <paths.data_root>/<name>
    kaggle_slug: str | None = None  # default: name
    layout: Literal["csv", "folders"] = "csv"  # labels from train_csv, or from class folders under train_dir
    train_csv: str = "train.csv"
    id_col: str = "id"
    label_col: str = "label"
    group_col: str | None = None  # a column of train_csv that must not straddle folds
    train_dir: str = "train"
    test_dir: str = "test"
    # Appended to ids that do not name a file as they are (e.g. ".jpg"); None: try the id
    # as given, then the common image extensions.
    image_ext: str | None = None
    sample_submission: str = "sample_submission.csv"
    sub_id_col: str | None = None  # default: sample_submission's first column
    # "label": one target column holding the class; "proba": one column per class; "auto": from its shape.
    submission_format: Literal["auto", "label", "proba"] = "auto"
    metric: Annotated[str, Choice(METRICS)] = "accuracy"  # kpipe.eval.metrics


class ModelConfig(Section):
    # any timm name; googlenet, alexnet, vgg11..vgg19(_bn) (torchvision); simple_cnn (kpipe's plain baseline)
    name: str = "resnet18"
    pretrained: bool = True
    weights: str | None = None  # local state dict or checkpoint; used instead of a download
    freeze_until: str | None = None  # stage name: every stage before it is frozen (e.g. "layer4")
    unfreeze_epoch: int | None = None  # epoch (0-based) at which frozen stages start training
    act: Literal["default", "relu", "leaky_relu", "silu"] = "default"
    small_stem: bool = False  # 3x3 stride-1 stem, no max-pool, for 32-64 px inputs
    drop_rate: float = 0.0
    # more constructor arguments for the backbone (timm: drop_path_rate, norm_layer, ...; torchvision: dropout)
    kwargs: dict[str, Any] = {}
    init: Literal["default", "kaiming"] = "default"  # kaiming: re-initialise every weight (from scratch only)


class DataConfig(Section):
    img_size: int | None = None  # default: the model's input size
    mean: list[float] | None = None  # default: the model's normalisation
    std: list[float] | None = None
    # a preset name, or a list of single ops ([hflip, rotate] or "hflip,rotate"); kpipe.data.presets
    aug: Annotated[str | list[str], AfterValidator(_check_aug)] = "light"
    hflip: bool = True  # false where a mirror changes the class (digits, text, left/right anatomy)
    batch_aug: bool = False  # flips + resized crop on whole uint8 batches (needs cache); see README
    cache: bool = False  # decode once: images resized to img_size, uint8, memory-mapped
    cache_dir: str = "cache"
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(2, ge=0)
    # none | weighted (each class equally likely) | oversample / undersample (to the mean class count)
    sampling: Literal["none", "weighted", "oversample", "undersample"] = "none"  # kpipe.data.loader.SAMPLINGS
    balanced_sampling: bool = False  # the older spelling of sampling=weighted
    pseudo: str | None = None  # `kpipe pseudo`'s CSV: test images added to every fold's training rows only
    pseudo_weight: float = Field(1.0, gt=0)  # each pseudo row's loss weight (labelled rows weigh 1)

    @model_validator(mode="after")
    def _one_sampling(self) -> DataConfig:
        if self.balanced_sampling and self.sampling not in ("none", "weighted"):
            raise ValueError(
                f"data.balanced_sampling=true (weighted) and data.sampling={self.sampling} "
                "contradict each other; keep data.sampling only"
            )
        if isinstance(self.aug, list) and "hflip" in self.aug and not self.hflip:
            raise ValueError("data.aug lists hflip but data.hflip=false forbids flips; drop one of them")
        return self

    @property
    def sampling_mode(self) -> str:
        """data.sampling, with balanced_sampling=true read as weighted."""
        return "weighted" if self.balanced_sampling else self.sampling


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    folds: list[int] | None = None  # default: every fold in the folds file
    # `kpipe train --full`'s epochs; default: the CV run's mean best epoch
    full_epochs: int | None = Field(None, ge=1)
    teacher: str | None = None  # run folder: fold k's student learns from the teacher's own fold<k>/best.pt
    # softens the teacher's probabilities: p^(1/T), renormalised
    distill_temperature: float = Field(1.0, gt=0)
    # target = (1 - w) x label + w x softened teacher
    distill_weight: float = Field(0.5, ge=0, le=1)
    optimizer: Annotated[str, Choice(OPTIMIZERS)] = "adamw"  # kpipe.nn.optim
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: Annotated[str, Choice(SCHEDULERS)] = "cosine"  # kpipe.nn.optim
    warmup_epochs: int = 0
    step_size: int = 3
    gamma: float = 0.1
    plateau_patience: int = 2
    # timm's default. On the demo's cleaned labels (same folds) 0.1 scored CV 0.9862 / test 0.9900 against
    # 0.9822 / 0.9850 for 0. Train the run `kpipe relabel` reads with 0: smoothing hides misfiled images.
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    # also average the end-of-epoch weights of the last swa_epochs epochs (kpipe.nn.average)
    swa: bool = False
    swa_epochs: int = Field(3, ge=1)
    accum_steps: int = 1
    clip_grad: float | None = None
    early_stop_patience: int | None = None
    amp: bool = True  # CUDA only: bf16 where supported, else fp16 with a grad scaler
    channels_last: bool = True  # CUDA only
    # CUDA only: cuDNN times its kernels for the (fixed) input size and keeps the fastest, and fp32 matmuls
    # and convolutions may use TF32, as timm's train.py does; false for cuDNN's default choice
    cudnn_benchmark: bool = True
    compile: bool = False
    sync_bn: bool = False  # DDP only
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"


class FoldsConfig(Section):
    n_folds: int = 5
    seed: int = 42
    clean_labels: bool = True  # apply `kpipe relabel --apply`'s labels_clean.csv when there is one


class InferConfig(Section):
    runs: list[str] | None = None  # run folders to ensemble; default: this experiment's run
    tta: list[str] = ["identity"]
    agg: Literal["mean", "geomean"] = "mean"
    batch_size: int = 64
    ensemble_weights: str | None = None  # JSON written by `kpipe ensemble`
    name: PlainName | None = None  # default: the experiment name
    package: str | None = None  # a folder written by `kpipe package`: its runs, views and weights, not runs/
    # auto: the fastest form this device runs natively (bf16 on a CPU with native bf16, AMP on CUDA), kept only
    # when it agrees with fp32 on a sample of the run's own validation images; else fp32 (reason in the sidecar).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True  # NHWC tensors: faster convolutions on CPUs (oneDNN) and GPUs alike
    # What runs the models' forward: torch, openvino (CPU only: each fold converted in memory, bf16 where the CPU
    # has it natively), or auto (openvino on the CPU when it is installed and agrees with torch fp32 on the
    # validation sample infer.precision checks with; else torch). The choice and its figures go into the sidecar.
    # torch by default: on the dev VM OpenVINO bf16 ran level with torch's best CPU form (docs/bench-example.md).
    runtime: Literal["auto", "torch", "openvino"] = "torch"
    compile: bool = False  # torch.compile each fold model (weights frozen on CPU); ignored when OpenVINO runs
    # Where test JPEGs are decoded: cpu (loader workers, OpenCV), gpu (nvJPEG on the model's device, workers only
    # read bytes; kpipe.data.device_decode), auto (gpu on CUDA when a timing of the first batches finds it faster).
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    precision_check_images: int = Field(256, ge=1)  # validation images the auto check predicts twice
    # predictions/<name>/members/*.npy, one per run x fold x view: float32, float16 (half the bytes) or none.
    save_views: Literal["float32", "float16", False] = "float32"


class PackageConfig(Section):
    """`kpipe package`: the runs as a Kaggle dataset (package/<name>/)."""

    name: PlainName | None = None  # default: <experiment name>-package; also the dataset's slug
    owner: str | None = None  # Kaggle user or organisation; default: $KAGGLE_USERNAME
    title: str | None = None  # default: "kpipe <name>"
    license: str = "CC0-1.0"
    max_mb: float = Field(20_000.0, gt=0)  # refuse a larger package (Kaggle's dataset limits; upload time)
    # Wheels of these distributions (at kpipe's version range) go into wheels/deps/ for the notebook to
    # install offline, for a Kaggle image whose copy is missing or out of range (e.g. [albumentations, albucore]).
    bundle_deps: list[str] = []
    # Validation images (resized to the runs' size, JPEG) packed into check/ so the notebook can check
    # infer.precision=auto / infer.runtime against fp32 on Kaggle's own CPU or GPU; 0: none (it then runs fp32).
    check_images: int = Field(256, ge=0, le=10_000)  # le: the most rows a package's check.csv may list
    python: str = "3.11"  # the Kaggle image's Python, which the bundled wheels must fit
    platform: list[str] = ["manylinux2014_x86_64", "manylinux_2_28_x86_64"]


class KernelConfig(Section):
    """`kpipe kernel`: the internet-off inference notebook (kernels/<name>/)."""

    name: PlainName | None = None  # default: <experiment name>-infer; also the notebook's slug
    enable_gpu: bool = True
    time_limit_min: float = Field(540.0, gt=0)  # the competition's run-time limit (9 h on most)
    hidden_test_size: int | None = Field(None, ge=1)  # rows of the hidden test, for the dry-run's projection
    dry_run_rows: int | None = Field(None, ge=1)  # second dry-run's test size; default: 3x the public test


class PathsConfig(Section):
    data_root: str = "data"
    folds_dir: str = "folds"
    runs_dir: str = "runs"
    predictions_dir: str = "predictions"
    submissions_dir: str = "submissions"
    packages_dir: str = "package"
    kernels_dir: str = "kernels"


class Config(Section):
    """The whole resolved config. Written beside every output as config.yaml."""

    name: PlainName = "default"  # experiment name; default: the experiment file's stem
    competition: CompetitionConfig
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    folds: FoldsConfig = FoldsConfig()
    infer: InferConfig = InferConfig()
    package: PackageConfig = PackageConfig()
    kernel: KernelConfig = KernelConfig()
    paths: PathsConfig = PathsConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- loading


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every valid dotted key of the schema, for suggestions."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        sub = _section_type(field.annotation)
        keys.append(prefix + name)
        if sub is not None:
            keys.extend(_all_keys(sub, prefix + name + "."))
    return keys


def _section_type(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    return None


def suggest(key: str) -> str:
    """' (did you mean 'train.lr'?)' for a mistyped dotted key, or ''."""
    keys = _all_keys(Config)
    leaf = key.rsplit(".", 1)[-1]
    matches = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not matches:  # a right leaf under the wrong section: 'lr' -> 'train.lr'
        matches = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    if not matches:
        matches = difflib.get_close_matches(leaf, keys, n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KpipeError(f"{path}: config file not found. Check the path (configs live under configs/).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise KpipeError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KpipeError(f"{path}: expected a mapping of keys at the top, got {type(data).__name__}.")
    return data


def _merge(
    dst: dict[str, Any], src: dict[str, Any], source: str, prov: dict[str, str], prefix: str = ""
) -> None:
    """Deep-merge src into dst, recording which file set each leaf key."""
    for k, v in src.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v, source, prov, key + ".")
        else:
            dst[k] = _copy(v)
            prov[key] = source
            if isinstance(v, dict):
                for sub in _flatten(v, key + "."):
                    prov[sub] = source


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def _flatten(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out.extend(_flatten(v, prefix + k + "."))
    return out


def _load_experiment(path: Path, prov: dict[str, str], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise KpipeError(f"{path}: inherits itself ({chain}). Remove the loop from the 'inherit' keys.")
    raw = _read_yaml(path)
    parents = raw.pop("inherit", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise KpipeError(f"{path}: 'inherit' must be a file path or a list of them.")
    merged: dict[str, Any] = {}
    for parent in parents:
        _merge(merged, _load_experiment(path.parent / parent, prov, (*seen, path)), "", {})
    parent_prov = dict(prov)
    _merge(merged, raw, _rel(path), prov)
    for k, v in parent_prov.items():
        prov.setdefault(k, v)
    return merged


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4). Values are parsed as YAML scalars."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise KpipeError(
            f"{CMDLINE}: bad override '{text}': expected key=value, e.g. {key or 'train.lr'}=<value>."
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def load_config(
    exp: str | Path | None = None,
    comp: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Build the resolved Config from an experiment file, a competition file and overrides."""
    prov: dict[str, str] = {}
    data: dict[str, Any] = {}
    if exp is not None:
        data = _load_experiment(Path(exp), prov)
        data.setdefault("name", Path(exp).stem)
    if comp is not None:
        comp_path = Path(comp)
        comp_raw = _read_yaml(comp_path)
        _merge(data, {"competition": comp_raw}, _rel(comp_path), prov)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise KpipeError(f"{CMDLINE}: bad override '{text}': '{k}' is not a section.")
        node[keys[-1]] = value
        prov[".".join(keys)] = CMDLINE
    if "competition" not in data:
        raise KpipeError(
            "no competition given: pass --comp configs/competition/<name>.yaml "
            "(or set COMP=<name> with make)."
        )
    return validate(data, prov)


def validate(data: dict[str, Any], prov: dict[str, str] | None = None) -> Config:
    """Validate a plain dict (e.g. a run's saved config.yaml) into a Config, with readable errors."""
    prov = prov or {}
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise KpipeError(_format_errors(e, prov)) from None


def _format_errors(err: ValidationError, prov: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not isinstance(p, int)]
        key = ".".join(loc)
        source = _source_of(key, prov)
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'{suggest(key)}")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}'")
        else:
            got = e.get("input")
            lines.append(f"{source}: {key}: {e['msg'].removeprefix('Value error, ')} (got {got!r})")
    return "config error:\n  " + "\n  ".join(lines) if len(lines) > 1 else lines[0]


def _source_of(key: str, prov: dict[str, str]) -> str:
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        hit = prov.get(".".join(parts[:i]))
        if hit:
            return hit
    return "config"


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a training run saved; infer and relabel read runs through this."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise KpipeError(f"{run_dir}: no config.yaml here. Is this a run folder written by `kpipe train`?")
    raw = _read_yaml(path)
    return validate(raw, {k: _rel(path) for k in _flatten(raw)})
