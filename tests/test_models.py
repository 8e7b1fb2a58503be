"""models.create and friends on tiny models: forward shapes, freezing, weights files, errors."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from kpipe.config import DataConfig, ModelConfig
from kpipe.errors import KpipeError
from kpipe.nn import models

TIMM_TINY = ("test_resnet", "resnet10t")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _forward(model: nn.Module, size: int = 32, batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


@pytest.mark.parametrize("name", [*TIMM_TINY, "googlenet"])
@pytest.mark.parametrize("small_stem", [False, True])
def test_forward_shape(name: str, small_stem: bool) -> None:
    model = models.create(name, 5, small_stem=small_stem)
    assert _forward(model).shape == (2, 5)


def test_small_stem_keeps_resolution() -> None:
    feats = {}
    for small in (False, True):
        model = models.create("test_resnet", 3, small_stem=small).eval()
        with torch.no_grad():
            feats[small] = model.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1]
    assert feats[True] == 4 * feats[False]  # stride 4 stem -> stride 1
    plain = models.create("resnet18", 3, small_stem=True)
    assert plain.conv1.kernel_size == (3, 3) and plain.conv1.stride == (1, 1)
    assert plain.conv1.out_channels == 64 and isinstance(plain.maxpool, nn.Identity)
    g = models.create("googlenet", 3, small_stem=True)
    assert g.conv1.conv.stride == (1, 1) and isinstance(g.maxpool1, nn.Identity)
    with pytest.raises(KpipeError, match="small_stem"):
        models.create("test_vit", 3, small_stem=True)


def test_stage_names() -> None:
    assert models.stage_names(models.create("resnet10t", 3)) == [
        "conv1",
        "bn1",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "fc",
    ]
    assert models.stage_names(models.create("googlenet", 3)) == [
        "conv1",
        "conv2",
        "conv3",
        "inception3",
        "inception4",
        "inception5",
        "fc",
    ]


def _one_step(model: nn.Module) -> dict[str, torch.Tensor]:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    models.train_mode(model)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    return before


@pytest.mark.parametrize(
    ("name", "stage", "frozen_prefixes"),
    [
        ("test_resnet", "layer4", ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")),
        ("googlenet", "inception5", ("conv1.", "conv2.", "conv3.", "inception3", "inception4")),
    ],
)
def test_freeze_until(name: str, stage: str, frozen_prefixes: tuple[str, ...]) -> None:
    model = models.create(name, 3, freeze_until=stage, small_stem=True)
    total, trainable = models.param_counts(model)
    assert 0 < trainable < total
    before = _one_step(model)
    after = model.state_dict()
    changed = {k for k, old in before.items() if not torch.equal(after[k], old)}
    frozen = {k for k in before if k.startswith(frozen_prefixes)}
    assert frozen and not frozen & changed  # weights and BN running stats bit-identical
    # (some trainable weights may legitimately stay: timm zero-inits each block's last BN)
    assert {f"{stage}.", "fc."} <= {k.split(".")[0].rstrip("ab") + "." for k in changed}
    bns = [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(not m.training for m in bns) and any(m.training for m in bns)
    models.set_frozen(model, stage, False)
    assert models.param_counts(model)[1] == total
    models.train_mode(model)
    assert all(m.training for m in bns)


def test_freeze_errors() -> None:
    model = models.create("test_resnet", 3)
    with pytest.raises(KpipeError, match="did you mean 'layer4'"):
        models.set_frozen(model, "layer 4", True)
    models.set_frozen(model, None, True)
    assert models.param_counts(model)[0] == models.param_counts(model)[1]


def test_act_choice() -> None:
    model = models.create("resnet10t", 3, act="silu")
    assert any(isinstance(m, nn.SiLU) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert any(
        isinstance(m, nn.LeakyReLU) for m in models.create("test_resnet", 3, act="leaky_relu").modules()
    )
    with pytest.raises(KpipeError, match="googlenet.*model.act=silu"):
        models.create("googlenet", 3, act="silu")
    with pytest.raises(KpipeError, match="does not take model.act=silu"):
        models.create("dla34", 3, act="silu")


def test_unknown_name_suggests() -> None:
    with pytest.raises(KpipeError, match="'resnet18'"):
        models.create("resnt18", 3)
    with pytest.raises(KpipeError, match="googlenet"):
        models.create("googlnet", 3)


def _checkpoint(model: nn.Module, **extra: Any) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "classes": ["a", "b", "c"],
        "config": {"model": {"name": "x"}},
        "epoch": 3,
        "score": 0.5,
        **extra,
    }


@pytest.mark.parametrize("form", ["checkpoint", "state_dict", "wrapped", "ddp_prefix"])
def test_weights_file_round_trip(tmp_path: Path, form: str) -> None:
    src = models.create("test_resnet", 3, small_stem=True)
    sd = src.state_dict()
    obj: Any = {
        "checkpoint": _checkpoint(src),
        "state_dict": sd,
        "wrapped": {"state_dict": sd, "optimizer": {}},
        "ddp_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }[form]
    torch.save(obj, tmp_path / "w.pt")
    dst = models.create("test_resnet", 3, small_stem=True, weights=tmp_path / "w.pt", pretrained=True)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_weights_file_new_head_and_stem(tmp_path: Path) -> None:
    src = models.create("resnet18", 1000)
    torch.save(src.state_dict(), tmp_path / "imagenet.pth")
    dst = models.create("resnet18", 4, weights=tmp_path / "imagenet.pth", small_stem=True)
    assert dst.fc.out_features == 4 and dst.conv1.kernel_size == (3, 3)  # both kept fresh
    assert torch.equal(dst.layer3[0].conv1.weight, src.layer3[0].conv1.weight)


def test_weights_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KpipeError, match="file not found"):
        models.create("test_resnet", 3, weights=tmp_path / "nope.pt")
    torch.save(models.create("resnet10t", 3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(KpipeError, match="shapes differ|Missing keys"):
        models.create("test_resnet", 3, weights=tmp_path / "other.pt")
    sd = models.create("test_resnet", 3).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["layer1.0.conv1.weight"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(
        KpipeError, match=r"Missing keys: 'layer1.0.conv1.weight'.*Unexpected keys: 'extra.weight'"
    ):
        models.create("test_resnet", 3, weights=tmp_path / "partial.pt")
    (tmp_path / "junk.pt").write_text("hello", encoding="utf-8")
    with pytest.raises(KpipeError, match="junk.pt"):
        models.create("test_resnet", 3, weights=tmp_path / "junk.pt")


def test_download_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(KpipeError, match=r"No internet\? .*model.weights=<file>"):
        models.create("googlenet", 3, pretrained=True)

    real = timm.create_model

    def timm_offline(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", timm_offline)
    with pytest.raises(KpipeError, match=r"'test_resnet'.*model.weights=<file>"):
        models.create("test_resnet", 3, pretrained=True)


def test_resolve_data_config_config_wins() -> None:
    model = models.create("test_resnet", 3)
    d = models.resolve_data_config(model, DataConfig())
    assert d["img_size"] == 160 and d["mean"] == (0.5, 0.5, 0.5) and d["interpolation"] == "bilinear"
    d = models.resolve_data_config(model, DataConfig(img_size=32, mean=[0.1, 0.2, 0.3], std=[1, 1, 1]))
    assert d == {"img_size": 32, "mean": (0.1, 0.2, 0.3), "std": (1.0, 1.0, 1.0), "interpolation": "bilinear"}
    g = models.resolve_data_config(nn.DataParallel(models.create("googlenet", 3)), DataConfig())
    assert g["img_size"] == 224 and g["mean"] == (0.5, 0.5, 0.5)
    with pytest.raises(KpipeError, match="3 values"):
        models.resolve_data_config(model, DataConfig(mean=[0.5]))


def test_create_from_config() -> None:
    mcfg = ModelConfig(
        name="test_resnet", pretrained=False, freeze_until="layer3", small_stem=True, drop_rate=0.1
    )
    model = models.create_from_config(mcfg, 7)
    assert _forward(model).shape == (2, 7)
    assert not model.layer2[0].conv1.weight.requires_grad and model.layer3[0].conv1.weight.requires_grad


def test_weights_in_hub_formats(tmp_path: Path) -> None:
    # torchvision's googlenet-1378be20.pth: 1000 classes plus aux heads kpipe does not build.
    tv = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=1000)
    torch.save(tv.state_dict(), tmp_path / "googlenet.pth")
    g = models.create("googlenet", 5, weights=tmp_path / "googlenet.pth")
    assert g.fc.out_features == 5 and torch.equal(
        g.inception4a.branch1.conv.weight, tv.inception4a.branch1.conv.weight
    )
    # The timm hub serves model.safetensors.
    src = models.create("test_resnet", 1000)
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    dst = models.create("test_resnet", 3, weights=tmp_path / "model.safetensors")
    assert torch.equal(dst.layer2[0].conv1.weight, src.layer2[0].conv1.weight)


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet10t", "test_resnet", "googlenet", "resnet18.a1_in1k", "efficientnet_b0"]
)
def test_default_input_size_equals_the_built_model(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mcfg = ModelConfig(name=name, pretrained=False)
    built = models.resolve_data_config(models.create_from_config(mcfg, 3), DataConfig())["img_size"]
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(torchvision.models, "googlenet", lambda *a, **k: pytest.fail("a model was built"))
    assert models.default_input_size(mcfg) == built


def test_default_input_size_names_a_wrong_model() -> None:
    with pytest.raises(KpipeError, match="resnet18"):
        models.default_input_size(ModelConfig(name="resnet81"))
    with pytest.raises(KpipeError, match="bogus"):
        models.default_input_size(ModelConfig(name="resnet18.bogus"))


# ---------------------------------------------------------------- torchvision AlexNet/VGG, simple_cnn, kwargs, init

NEW_NAMES = (*models.TV_PLAIN, "simple_cnn")
STAGES = {
    "alexnet": ["block1", "block2", "block3", "fc1", "fc2", "fc3"],
    "vgg": ["block1", "block2", "block3", "block4", "block5", "fc1", "fc2", "fc3"],
    "simple_cnn": ["block1", "block2", "block3", "fc1", "fc2", "fc3"],
}


@pytest.mark.parametrize("name", NEW_NAMES)
def test_new_models_build_with_stages_head_and_preprocessing(name: str) -> None:
    with torch.device("meta"):  # VGG19 is 140M parameters: shapes and structure only
        model = models.create(name, 5, pretrained=False)
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)
    assert models.stage_names(model) == STAGES[name if name in STAGES else "vgg"]
    head = model.fc3 if name == "simple_cnn" else model.classifier[6]
    assert head.out_features == 5 and set(models.stage_modules(model)) == set(models.stage_names(model))
    d = models.resolve_data_config(model, DataConfig())
    assert d["img_size"] == 224 and d["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert models.default_input_size(ModelConfig(name=name)) == 224


@pytest.mark.parametrize(
    ("name", "size", "stage"),
    [("alexnet", 64, "block3"), ("vgg11_bn", 32, "block5"), ("simple_cnn", 32, "block3")],
)
def test_new_models_train_one_step_frozen_and_predict(name: str, size: int, stage: str) -> None:
    model = models.create(name, 3, pretrained=False, freeze_until=stage)
    total, trainable = models.param_counts(model)
    assert 0 < trainable < total
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    models.train_mode(model)
    nn.functional.cross_entropy(model(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    stages = models._stages(model)
    frozen_paths = tuple(
        f"{p}."
        for s in models.stage_names(model)[: models.stage_names(model).index(stage)]
        for p in stages[s]
    )
    frozen = {k for k in before if k.startswith(frozen_paths)}
    assert frozen and not frozen & changed  # weights and BN running stats unchanged
    assert any(k.startswith(tuple(f"{p}." for p in stages[stage])) for k in changed)
    assert _forward(model, size).shape == (2, 3)
    models.set_frozen(model, stage, False)
    assert models.param_counts(model)[1] == total


def test_alexnet_names_its_smallest_input() -> None:
    a = models.create("alexnet", 3, pretrained=False)
    assert models.resolve_data_config(a, DataConfig(img_size=63))["img_size"] == 63
    assert _forward(a, 63).shape == (2, 3)
    with pytest.raises(KpipeError, match="too small for alexnet"):
        models.resolve_data_config(a, DataConfig(img_size=32))


def test_torchvision_weights_file_keeps_features_and_resets_head(tmp_path: Path) -> None:
    tv = torchvision.models.alexnet(weights=None)  # what AlexNet_Weights.IMAGENET1K_V1 holds: 1000 classes
    torch.save(tv.state_dict(), tmp_path / "alexnet.pth")
    a = models.create("alexnet", 4, weights=tmp_path / "alexnet.pth")
    assert a.classifier[6].out_features == 4
    assert torch.equal(a.features[3].weight, tv.features[3].weight) and torch.equal(
        a.classifier[4].weight, tv.classifier[4].weight
    )


def test_torchvision_download_failure_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with (
        pytest.raises(KpipeError, match=r"model.weights=<file>.*vgg16_bn-6c64b313.pth"),
        torch.device("meta"),
    ):
        models.create("vgg16_bn", 3, pretrained=True)


def test_simple_cnn_has_no_pretrained_weights() -> None:
    with pytest.raises(KpipeError, match="simple_cnn has no pretrained weights"):
        models.create("simple_cnn", 3, pretrained=True)
    small = models.create("simple_cnn", 3, pretrained=False, kwargs={"width": 8, "hidden": 32}, act="silu")
    assert small.block1[0].out_channels == 8 and isinstance(small.block1[2], nn.SiLU)


def test_kwargs_reach_the_backbone() -> None:
    m = models.create_from_config(
        ModelConfig(
            name="test_resnet", pretrained=False, kwargs={"drop_path_rate": 0.2, "norm_layer": "groupnorm1"}
        ),
        3,
    )
    assert isinstance(m.bn1, nn.GroupNorm)
    assert any(type(x).__name__ == "DropPath" and x.drop_prob > 0 for x in m.modules())
    with torch.device("meta"):
        v = models.create("vgg11", 3, pretrained=False, kwargs={"dropout": 0.1})
    assert v.classifier[2].p == 0.1


def test_wrong_kwargs_fail_naming_the_key() -> None:
    with pytest.raises(KpipeError, match=r"'test_resnet' does not take model.kwargs.drop_ratio=0.1"):
        models.create("test_resnet", 3, pretrained=False, kwargs={"drop_ratio": 0.1})
    with (
        pytest.raises(KpipeError, match=r"'vgg11' does not take model.kwargs.drop_path_rate"),
        torch.device("meta"),
    ):
        models.create("vgg11", 3, pretrained=False, kwargs={"drop_path_rate": 0.1})
    with pytest.raises(KpipeError, match=r"norm_layer.*instancenorm"):
        models.create("test_resnet", 3, pretrained=False, kwargs={"norm_layer": "instancenorm"})
    with pytest.raises(KpipeError, match="num_classes"):
        models.create("test_resnet", 3, pretrained=False, kwargs={"num_classes": 3})
    with pytest.raises(KpipeError, match="model.drop_rate both"):
        models.create("test_resnet", 3, pretrained=False, drop_rate=0.1, kwargs={"drop_rate": 0.2})


def test_kaiming_init_from_scratch_only() -> None:
    torch.manual_seed(0)
    plain = models.create("test_resnet", 3, pretrained=False)
    torch.manual_seed(0)
    he = models.create_from_config(ModelConfig(name="test_resnet", pretrained=False, init="kaiming"), 3)
    assert not torch.equal(plain.conv1[0].weight, he.conv1[0].weight) and torch.count_nonzero(he.fc.bias) == 0
    assert he.fc.weight.std() < 0.02  # small first logits
    cnn = models.create("simple_cnn", 10, pretrained=False, init="kaiming").eval()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(cnn(torch.randn(16, 3, 32, 32)), torch.arange(16) % 10)
    assert abs(loss.item() - math.log(10)) < 0.5
    assert all(torch.all(m.weight == 1) for m in he.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(KpipeError, match="model.pretrained=false"):
        models.create("test_resnet", 3, pretrained=True, init="kaiming")
