"""Model construction: any timm model, torchvision's GoogLeNet, AlexNet and VGG, and a small plain
CNN baseline (`simple_cnn`), behind one interface.

`create` builds the network with a fresh `num_classes` head, optionally a small stem for tiny
inputs, another activation, extra constructor arguments (`model.kwargs`: drop_path_rate,
norm_layer, ...), pretrained weights (a timm/torchvision download, or a local file for machines
without internet), a weight re-initialisation for from-scratch runs and frozen stages. Stages are
the model's top-level children with parameters (timm ResNets: conv1, bn1, layer1..layer4, fc;
GoogLeNet: conv1, conv2, conv3, inception3, inception4, inception5, fc; simple_cnn: block1..block3,
fc1..fc3); AlexNet and VGG, whose convolutions sit in one `features` Sequential, get one stage per
pooling block (block1..block5) and one per linear layer of their classifier (fc1..fc3); their
modules keep torchvision's paths (features.0, classifier.6), so torchvision's weights files load.
`freeze_until="layer4"` freezes every stage before layer4. Frozen BatchNorm layers must also stop
updating their running statistics: call `train_mode(model)` instead of `model.train()` at the start
of every epoch.
`default_input_size` reads the input size from timm's pretrained config without building anything.
Usage: ``model = create("resnet50", 5, pretrained=True, freeze_until="layer4")``.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from timm.data.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
)
from timm.layers import get_act_layer
from timm.models import PretrainedCfg, get_pretrained_cfg
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kpipe.config import DataConfig, ModelConfig
from kpipe.errors import KpipeError, preview

log = logging.getLogger(__name__)

GOOGLENET = "googlenet"
SIMPLE_CNN = "simple_cnn"
# torchvision models kpipe builds by these exact names (timm's own vgg* carry a tag: vgg16.tv_in1k).
TV_PLAIN = ("alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
TORCHVISION = (GOOGLENET, *TV_PLAIN)
OWN = (SIMPLE_CNN,)
INITS = ("default", "kaiming")
# kpipe sets these itself; model.kwargs may not.
_RESERVED_KWARGS = ("num_classes", "pretrained", "weights", "pretrained_cfg")
ACTS = ("default", "relu", "leaky_relu", "silu")
# Keys other stacks add in front of parameter names: DDP/DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# torchvision's GoogLeNet weights carry auxiliary heads that kpipe does not build.
_IGNORED_KEYS = ("aux1.", "aux2.")
# GoogLeNet's preprocessing, in timm's pretrained-config form (see _torchvision_model for the 0.5 stats).
GOOGLENET_CFG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": IMAGENET_INCEPTION_MEAN,
    "std": IMAGENET_INCEPTION_STD,
    "crop_pct": 0.875,
    "classifier": "fc",
    "first_conv": "conv1.conv",
}
# AlexNet's and VGG's preprocessing (torchvision's ImageNet transforms), same form.
TV_PLAIN_CFG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "crop_pct": 0.875,
    "classifier": "classifier.6",
    "first_conv": "features.0",
}
ALEXNET_MIN_SIZE = 63
# simple_cnn's: no pretrained weights, so nothing to match; ImageNet statistics and size keep it
# comparable with the backbones it is a baseline for (data.img_size/mean/std override them).
SIMPLE_CNN_CFG: dict[str, Any] = {**TV_PLAIN_CFG, "classifier": "fc3", "first_conv": "block1.0"}


def create(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights: str | os.PathLike[str] | None = None,
    freeze_until: str | None = None,
    act: str = "default",
    small_stem: bool = False,
    drop_rate: float = 0.0,
    kwargs: dict[str, Any] | None = None,
    init: str = "default",
) -> nn.Module:
    """Build `name` with a `num_classes` head.

    pretrained: download ImageNet weights (timm hub / torchvision) unless `weights` names a
    local file, which is then used instead: a state dict, a kpipe checkpoint ({"model": ...})
    or {"state_dict": ...}. Classifier weights whose shape differs are dropped (fresh head).
    kwargs: more arguments for the backbone's constructor (timm create_model's drop_path_rate,
    norm_layer, ...; torchvision's dropout); one the backbone does not take is a KpipeError naming it.
    init="kaiming": re-initialise every weight (He normal), for from-scratch runs only.
    """
    if num_classes < 1:
        raise KpipeError(f"num_classes must be at least 1, got {num_classes}.")
    if act not in ACTS:
        raise KpipeError(f"model.act='{act}' is not one of {', '.join(ACTS)}.")
    if init not in INITS:
        raise KpipeError(f"model.init='{init}' is not one of {', '.join(INITS)}.")
    if init != "default" and (pretrained or weights is not None):
        raise KpipeError(
            f"model.init={init} re-initialises every weight, which would throw the pretrained "
            "weights away: set model.pretrained=false and no model.weights, or model.init=default."
        )
    kwargs = _check_kwargs(kwargs or {}, drop_rate, act)
    download = pretrained and weights is None
    if name in TORCHVISION:
        model = _torchvision_model(name, num_classes, download, act, drop_rate, kwargs)
    elif name == SIMPLE_CNN:
        model = _simple_cnn(num_classes, download, act, drop_rate, kwargs)
    else:
        model = _timm_model(name, num_classes, download, act, drop_rate, kwargs)
    reset_ok = _classifier_prefixes(model)
    if small_stem:
        reset_ok += (make_small_stem(model, name),)
    if init == "kaiming":
        kaiming_init(model)
    if weights is not None:
        load_weights(model, weights, reset_ok)
    if freeze_until is not None:
        set_frozen(model, freeze_until, True)
    return model


def create_from_config(mcfg: ModelConfig, num_classes: int) -> nn.Module:
    """`create` with the model section of a config."""
    return create(
        mcfg.name,
        num_classes,
        pretrained=mcfg.pretrained,
        weights=mcfg.weights,
        freeze_until=mcfg.freeze_until,
        act=mcfg.act,
        small_stem=mcfg.small_stem,
        drop_rate=mcfg.drop_rate,
        kwargs=mcfg.kwargs,
        init=mcfg.init,
    )


def default_input_size(mcfg: ModelConfig) -> int:
    """The input side the model was made for, read from timm's pretrained config without building it.

    Equals `resolve_data_config(create_from_config(mcfg, n), DataConfig())["img_size"]`: what the data
    pipeline needs before the model exists (the cache's size), at no cost of building a network.
    """
    if mcfg.name == GOOGLENET:
        return int(GOOGLENET_CFG["input_size"][-1])
    if mcfg.name in TV_PLAIN:
        return int(TV_PLAIN_CFG["input_size"][-1])
    if mcfg.name == SIMPLE_CNN:
        return int(SIMPLE_CNN_CFG["input_size"][-1])
    _check_timm_name(mcfg.name)
    try:
        cfg = get_pretrained_cfg(mcfg.name)
    except RuntimeError as e:  # a known architecture with an unknown tag
        raise KpipeError(f"model.name='{mcfg.name}': {e}") from None
    # A model with no registered pretrained config gets timm's default one when it is built.
    return int((cfg if cfg is not None else PretrainedCfg()).input_size[-1])


def _check_timm_name(name: str) -> None:
    if not timm.is_model(name):
        names = [*timm.list_models(), *TORCHVISION, *OWN]
        close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KpipeError(
            f"model.name='{name}' is neither a timm model nor one of {', '.join((*TORCHVISION, *OWN))}.{hint} "
            "List timm models with: python -c \"import timm; print(timm.list_models('*resnet*'))\""
        )


def _check_kwargs(kwargs: dict[str, Any], drop_rate: float, act: str) -> dict[str, Any]:
    """model.kwargs, refused where kpipe sets the argument itself or another key already does."""
    reserved = [k for k in kwargs if k in _RESERVED_KWARGS]
    if reserved:
        raise KpipeError(
            f"model.kwargs.{reserved[0]}: kpipe sets '{reserved[0]}' itself; remove it from "
            "model.kwargs (model.pretrained, model.weights and the data's classes decide it)."
        )
    for key, setting, is_set in (
        ("drop_rate", "model.drop_rate", bool(drop_rate)),
        ("dropout", "model.drop_rate", bool(drop_rate)),  # torchvision's name for it
        ("act_layer", "model.act", act != "default"),
    ):
        if key in kwargs and is_set:
            raise KpipeError(f"model.kwargs.{key} and {setting} both set the same thing; keep one.")
    return dict(kwargs)


def _build(
    name: str, build: Callable[[], nn.Module], options: dict[str, str], extra: dict[str, Any]
) -> nn.Module:
    """build(), with a constructor's complaint about one of `options` (key -> the setting that passed it)
    or about a model.kwargs value turned into a KpipeError naming the setting."""
    try:
        return build()
    except TypeError as e:
        for key, setting in {**options, **{k: f"model.kwargs.{k}={v!r}" for k, v in extra.items()}}.items():
            if re.search(rf"\b{re.escape(key)}\b", str(e)):
                raise KpipeError(
                    f"model '{name}' does not take {setting}: its constructor has no '{key}' "
                    f"argument ({e}). Remove it, or pick a model that has it."
                ) from None
        raise
    except (KeyError, ValueError) as e:  # a model.kwargs value the backbone cannot use (norm_layer='foo')
        if not extra:
            raise
        raise KpipeError(
            f"model '{name}' could not be built with model.kwargs {extra} ({type(e).__name__}: {e}). "
            "Check the values: timm's norm_layer names are batchnorm, groupnorm, layernorm2d, ..."
        ) from e


def _timm_model(
    name: str, num_classes: int, download: bool, act: str, drop_rate: float, extra: dict[str, Any]
) -> nn.Module:
    _check_timm_name(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    # Only pass options that differ from the model's own default, so models without them still build.
    act_cls = get_act_layer(act) if act != "default" else None
    if act_cls is not None:
        kwargs["act_layer"] = act_cls  # a class, not a string: some models (vgg) call it directly
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    kwargs.update(extra)
    options = {"act_layer": f"model.act={act}", "drop_rate": f"model.drop_rate={drop_rate}"}
    try:
        model = _build(name, lambda: timm.create_model(name, pretrained=download, **kwargs), options, extra)
    except OSError as e:  # no network, hub unreachable, file not in the local cache
        raise _download_error(name, e) from None
    if act_cls is not None and not any(isinstance(m, act_cls) for m in model.modules()):
        raise KpipeError(
            f"model '{name}' ignored model.act={act} (no {act_cls.__name__} in it); use model.act=default."
        )
    return model


def _download_error(name: str, err: BaseException) -> KpipeError:
    return KpipeError(
        f"could not download pretrained weights for '{name}' ({type(err).__name__}: {err}). "
        "No internet? Put a weights file on this machine and set model.weights=<file> "
        f"(or model.pretrained=false to train from scratch).{_weights_source(name)}"
    )


def _weights_source(name: str) -> str:
    """Where the weights live, so they can be fetched on another machine."""
    if name in TORCHVISION:
        return f" The file: {torchvision.models.get_model_weights(name).IMAGENET1K_V1.url}"
    if name == SIMPLE_CNN:
        return ""
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return ""
    where = [
        f"https://huggingface.co/{cfg.hf_hub_id} (model.safetensors)" if cfg.hf_hub_id else "",
        cfg.url or "",
    ]
    return f" The file: {' or '.join(w for w in where if w)}" if any(where) else ""


def _torchvision_model(
    name: str, num_classes: int, download: bool, act: str, drop_rate: float, extra: dict[str, Any]
) -> nn.Module:
    if act != "default":
        raise KpipeError(f"{name} has its ReLU built in and takes no model.act={act}; use model.act=default.")
    tv = torchvision.models
    kwargs: dict[str, Any] = {}
    if name == GOOGLENET:
        # transform_input=False: normalisation happens once, in the data pipeline (see pretrained_cfg).
        kwargs.update(transform_input=False, dropout=drop_rate)
        if not download:
            kwargs.update(aux_logits=False, init_weights=True)
    elif drop_rate:  # AlexNet/VGG: their own dropout (0.5) unless asked otherwise
        kwargs["dropout"] = drop_rate
    kwargs.update(extra)
    builder = getattr(tv, name)
    if download:
        kwargs["weights"] = tv.get_model_weights(name).IMAGENET1K_V1
    else:
        kwargs.update(weights=None, num_classes=num_classes)
    try:
        model = _build(name, lambda: builder(**kwargs), {"dropout": f"model.drop_rate={drop_rate}"}, extra)
    except OSError as e:
        raise _download_error(name, e) from None
    if name == GOOGLENET:
        if download:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
        # The torchvision weights expect (x - 0.5) / 0.5 inputs: with transform_input=True torchvision
        # converts ImageNet-normalised inputs to exactly that inside forward(). Declaring the 0.5 stats
        # here gives the same numbers with one normalisation step. Read by timm's resolve_model_data_config.
        model.pretrained_cfg = dict(GOOGLENET_CFG)
    else:
        if download:
            model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
        model.pretrained_cfg = dict(TV_PLAIN_CFG)
        if name == "alexnet":  # a stride-4 stem and three stride-2 pools leave nothing of a smaller input
            model.pretrained_cfg["min_input_size"] = (3, ALEXNET_MIN_SIZE, ALEXNET_MIN_SIZE)
    return model


class SimpleCNN(nn.Module):
    """The plain baseline: three conv blocks (conv-BN-ReLU-maxpool) and three linear layers.

    For "how much does the backbone buy": what a from-scratch network with no design in it scores.
    The adaptive pool makes it take any input size. Stages: block1..block3, fc1..fc3.
    """

    def __init__(
        self,
        num_classes: int,
        width: int = 32,
        hidden: int = 256,
        drop_rate: float = 0.0,
        batch_norm: bool = True,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        chans = (3, width, 2 * width, 4 * width)
        for i in range(3):
            norm: nn.Module = nn.BatchNorm2d(chans[i + 1]) if batch_norm else nn.Identity()
            block = nn.Sequential(
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=not batch_norm),
                norm,
                act_layer(),
                nn.MaxPool2d(2),
            )
            self.add_module(f"block{i + 1}", block)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Sequential(nn.Linear(chans[-1] * 16, hidden), act_layer(), nn.Dropout(drop_rate))
        self.fc2 = nn.Sequential(nn.Linear(hidden, hidden // 2), act_layer(), nn.Dropout(drop_rate))
        self.fc3 = nn.Linear(hidden // 2, num_classes)
        self.pretrained_cfg = dict(SIMPLE_CNN_CFG)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block3(self.block2(self.block1(x))))
        return self.fc3(self.fc2(self.fc1(torch.flatten(x, 1))))


def _simple_cnn(
    num_classes: int, download: bool, act: str, drop_rate: float, extra: dict[str, Any]
) -> nn.Module:
    if download:
        raise KpipeError(
            f"{SIMPLE_CNN} has no pretrained weights: set model.pretrained=false "
            "(or model.weights=<file> saved from an earlier simple_cnn run)."
        )
    kwargs: dict[str, Any] = {"drop_rate": drop_rate}
    if act != "default":
        kwargs["act_layer"] = get_act_layer(act)
    kwargs.update(extra)
    return _build(SIMPLE_CNN, lambda: SimpleCNN(num_classes, **kwargs), {}, extra)


def kaiming_init(model: nn.Module) -> None:
    """model.init=kaiming: He-normal weights (convolutions fan_out, linear layers fan_in, ReLU gain), zero
    biases, norm layers at weight 1 and bias 0, and the classifier at N(0, 0.01) so the first logits are
    small (He-scaled logits start the loss near 15 instead of log(classes)). For from-scratch comparisons
    where the backbone's own init is not wanted."""
    head = _classifier_prefixes(model)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear) and f"{name}.".startswith(head):
            nn.init.normal_(m.weight, std=0.01)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            continue
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cls = getattr(model, "pretrained_cfg", {}).get("classifier") or "fc"
    names = [cls] if isinstance(cls, str) else list(cls)
    return tuple(f"{n}." for n in names)


def make_small_stem(model: nn.Module, name: str) -> str:
    """Swap the stem for a 3x3 stride-1 conv (same channels) and drop its max-pool, in place.

    For 32-64 px inputs, where a stride-4 stem throws away most of the image. The new conv is
    freshly initialised. Returns the new conv's module name.
    """
    if isinstance(model, torchvision.models.GoogLeNet):
        model.conv1.conv = _conv3x3_like(model.conv1.conv)
        model.maxpool1 = nn.Identity()
        return "conv1.conv"
    conv1, maxpool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if maxpool is not None and isinstance(conv1, nn.Conv2d):
        model.conv1 = _conv3x3_like(conv1)
        key = "conv1"
    elif maxpool is not None and isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d):
        conv1[0] = _conv3x3_like(conv1[0])  # deep stem (resnet10t, *d, *t): only its first conv strides
        key = "conv1.0"
    else:
        raise KpipeError(
            f"model.small_stem: '{name}' has no ResNet-style stem (conv1 + maxpool) to shrink; it works "
            "for timm ResNet/ResNeXt models and googlenet. Set model.small_stem=false."
        )
    model.maxpool = nn.Identity()
    return key


def _conv3x3_like(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)


# ---------------------------------------------------------------- weights files


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], reset_ok: tuple[str, ...] | None = None
) -> None:
    """Load a weights file into `model`, strictly except for keys under `reset_ok` prefixes.

    Keys under `reset_ok` (default: the classifier) that are missing from the file or have another
    shape keep their fresh initialisation, e.g. an ImageNet head when training 5 classes.
    """
    reset_ok = _classifier_prefixes(model) if reset_ok is None else reset_ok
    path = Path(path)
    if not path.is_file():
        raise KpipeError(
            f"model.weights: {path}: file not found. Copy the weights file there or fix the path."
        )
    state = _read_state_dict(path)
    own = model.state_dict()
    resettable = [k for k in own if k.startswith(reset_ok)]
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    fatal = [k for k in wrong if k not in resettable]
    if fatal:
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in fatal]
        raise KpipeError(f"model.weights: {path} does not fit this model; shapes differ: {preview(shapes)}")
    state = {k: v for k, v in state.items() if k not in wrong}
    missing = [k for k in own if k not in state and k not in resettable]
    unexpected = [k for k in state if k not in own and not k.startswith(_IGNORED_KEYS)]
    if missing or unexpected:
        raise KpipeError(
            f"model.weights: {path} does not match the model (is it for another architecture, "
            f"or saved with small_stem different?). Missing keys: {preview(missing) or 'none'}. "
            f"Unexpected keys: {preview(unexpected) or 'none'}."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    fresh = sorted({k.split(".")[0] for k in resettable if k not in state})
    log.info("loaded %s%s", path, f" (fresh: {', '.join(fresh)})" if fresh else "")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":  # what the timm hub serves
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        # torch.load fails on a foreign or damaged file with many exception types (KeyError,
        # UnpicklingError, RuntimeError, ...); all mean the same to the user, and the cause is chained.
        except Exception as e:
            raise KpipeError(
                f"model.weights: {path}: not a PyTorch weights file that torch.load(weights_only=True) can read "
                f"({type(e).__name__}: {e})"
            ) from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KpipeError(
            f"model.weights: {path}: no state dict found (expected a dict of tensors, or one under 'model' or 'state_dict')."
        )
    return {_strip_wrappers(k): v for k, v in obj.items()}


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


# ---------------------------------------------------------------- stages and freezing


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP/DataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _stages(model: nn.Module) -> dict[str, list[str]]:
    """Ordered stage name -> module paths (dotted). Modules without parameters are not stages."""
    model = unwrap(model)
    if isinstance(model, (torchvision.models.VGG, torchvision.models.AlexNet)):
        return _sequential_stages(model)
    grouped = isinstance(model, torchvision.models.GoogLeNet)
    stages: dict[str, list[str]] = {}
    for child_name, child in model.named_children():
        if next(child.parameters(), None) is None:
            continue
        m = re.fullmatch(r"(inception\d)[a-z]", child_name) if grouped else None
        stages.setdefault(m.group(1) if m else child_name, []).append(child_name)
    return stages


def _sequential_stages(model: nn.Module) -> dict[str, list[str]]:
    """AlexNet/VGG: `features` cut after each max-pool (block1..), `classifier` after each Linear (fc1..).

    The modules after a cut without parameters (ReLU, Dropout) open the next stage; trailing ones
    join the last.
    """
    stages: dict[str, list[str]] = {}
    for seq_name, stage, cut in (("features", "block", nn.MaxPool2d), ("classifier", "fc", nn.Linear)):
        groups: list[list[str]] = [[]]
        for child_name, child in getattr(model, seq_name).named_children():
            groups[-1].append(f"{seq_name}.{child_name}")
            if isinstance(child, cut):
                groups.append([])
        if (
            groups[-1]
            and len(groups) > 1
            and not any(next(model.get_submodule(p).parameters(), None) is not None for p in groups[-1])
        ):
            groups[-2].extend(groups.pop())
        for i, group in enumerate(g for g in groups if g):
            stages[f"{stage}{i + 1}"] = group
    return stages


def stage_names(model: nn.Module) -> list[str]:
    """Names `freeze_until` accepts, input to output."""
    return list(_stages(model))


def stage_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Each stage's last top-level module, input to output: its output is the stage's (for hooks)."""
    base = unwrap(model)
    return {stage: base.get_submodule(children[-1]) for stage, children in _stages(base).items()}


def set_frozen(model: nn.Module, freeze_until: str | None, frozen: bool) -> None:
    """Freeze (or unfreeze) every stage before `freeze_until`; None touches nothing.

    Parameters registered directly on the model (e.g. a ViT's pos_embed) go with the first stage.
    Build the optimizer over all parameters: frozen ones get no gradient and are skipped, so
    unfreezing later needs no new optimizer.
    """
    if freeze_until is None:
        return
    stages = _stages(model)
    if freeze_until not in stages:
        close = difflib.get_close_matches(freeze_until, list(stages), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KpipeError(
            f"model.freeze_until='{freeze_until}' is not a stage of this model{hint}; "
            f"stages: {', '.join(stages)}."
        )
    base = unwrap(model)
    before = list(stages)[: list(stages).index(freeze_until)]
    params = [p for s in before for child in stages[s] for p in base.get_submodule(child).parameters()]
    if before:
        params += list(base.parameters(recurse=False))
    for p in params:
        p.requires_grad_(not frozen)


def train_mode(model: nn.Module) -> nn.Module:
    """model.train(), but BatchNorm layers whose parameters are all frozen stay in eval mode.

    Without this a frozen stage still changes: its BN running statistics follow every batch.
    Call it at the start of every training epoch (after unfreezing too).
    """
    model.train()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()
    return model


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ---------------------------------------------------------------- preprocessing


def resolve_data_config(model: nn.Module, dcfg: DataConfig) -> dict[str, Any]:
    """Input size, mean, std and interpolation for `model`; values set in the config win.

    Model defaults come from timm's resolve_model_data_config (GoogLeNet carries its own).
    """
    base = timm.data.resolve_model_data_config(unwrap(model))
    img_size = dcfg.img_size if dcfg.img_size is not None else int(base["input_size"][-1])
    mean = tuple(float(x) for x in (dcfg.mean if dcfg.mean is not None else base["mean"]))
    std = tuple(float(x) for x in (dcfg.std if dcfg.std is not None else base["std"]))
    if len(mean) != 3 or len(std) != 3:
        raise KpipeError(
            f"data.mean and data.std need 3 values (R, G, B), got mean={list(mean)}, std={list(std)}."
        )
    if any(s <= 0 for s in std):
        raise KpipeError(f"data.std values must be positive, got {list(std)}.")
    if img_size < 8:
        raise KpipeError(f"data.img_size={img_size} is too small (at least 8 px).")
    if isinstance(unwrap(model), torchvision.models.AlexNet) and img_size < ALEXNET_MIN_SIZE:
        raise KpipeError(
            f"data.img_size={img_size} is too small for alexnet (at least {ALEXNET_MIN_SIZE} px): "
            "raise data.img_size, or use simple_cnn or a ResNet with model.small_stem=true."
        )
    return {
        "img_size": img_size,
        "mean": mean,
        "std": std,
        "interpolation": str(base.get("interpolation", "bilinear")),
    }
