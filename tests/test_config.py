"""Config: one schema, unknown keys and wrong types named with file and suggestion, inheritance, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kpipe import paths
from kpipe.config import load_config, load_run_config, validate
from kpipe.errors import KpipeError
from kpipe.io import write_yaml


def _w(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def comp(tmp_path: Path) -> Path:
    return _w(tmp_path / "comp.yaml", {"name": "c1"})


def test_defaults_and_derived_paths(comp: Path) -> None:
    cfg = load_config(None, comp)
    assert cfg.competition.name == "c1"
    assert str(paths.folds_csv(cfg)) == "folds/c1.csv"
    assert str(paths.data_dir(cfg)) == "data/c1"
    assert cfg.train.optimizer == "adamw"  # schema default


def test_unknown_key_names_file_and_suggestion(tmp_path: Path, comp: Path) -> None:
    exp = _w(tmp_path / "b0.yaml", {"train": {"lr_rate": 0.1}})
    with pytest.raises(KpipeError) as e:
        load_config(exp, comp)
    msg = str(e.value)
    assert "b0.yaml" in msg and "unknown key 'train.lr_rate'" in msg and "did you mean 'train.lr'" in msg


def test_unknown_section_key_in_competition_file(tmp_path: Path) -> None:
    comp = _w(tmp_path / "comp.yaml", {"name": "c1", "lable_col": "y"})
    with pytest.raises(
        KpipeError,
        match=r"comp.yaml: unknown key 'competition.lable_col' \(did you mean 'competition.label_col'",
    ):
        load_config(None, comp)


def test_wrong_type(tmp_path: Path, comp: Path) -> None:
    exp = _w(tmp_path / "e.yaml", {"train": {"epochs": "ten"}})
    with pytest.raises(KpipeError, match=r"e.yaml: train.epochs: .*integer.*'ten'"):
        load_config(exp, comp)


def test_wrong_literal(tmp_path: Path, comp: Path) -> None:
    with pytest.raises(KpipeError, match="train.optimizer"):
        load_config(None, comp, ["train.optimizer=adamm"])


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=3"])
def test_bad_override_syntax(comp: Path, bad: str) -> None:
    with pytest.raises(KpipeError, match="bad override"):
        load_config(None, comp, [bad])


def test_unknown_override_key_suggests(comp: Path) -> None:
    with pytest.raises(KpipeError, match=r"command line: unknown key 'train.lrr' \(did you mean 'train.lr'"):
        load_config(None, comp, ["train.lrr=1"])


def test_override_types_and_lists(comp: Path) -> None:
    cfg = load_config(None, comp, ["train.lr=3e-4", "train.folds=0,2", "infer.tta=[identity,hflip]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.folds == [0, 2]
    assert cfg.infer.tta == ["identity", "hflip"]


def test_inheritance_child_wins_and_parent_errors_name_parent(tmp_path: Path, comp: Path) -> None:
    base = _w(tmp_path / "base.yaml", {"train": {"lr": 0.1, "epochs": 7}, "model": {"name": "resnet50"}})
    child = _w(tmp_path / "child.yaml", {"inherit": "base.yaml", "train": {"lr": 0.01}})
    cfg = load_config(child, comp, ["train.epochs=3"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.model.name, cfg.name) == (0.01, 3, "resnet50", "child")
    _w(base, {"train": {"epochz": 1}})
    with pytest.raises(KpipeError, match=r"base.yaml: unknown key 'train.epochz'"):
        load_config(child, comp)


def test_inheritance_loop(tmp_path: Path, comp: Path) -> None:
    _w(tmp_path / "a.yaml", {"inherit": "b.yaml"})
    _w(tmp_path / "b.yaml", {"inherit": "a.yaml"})
    with pytest.raises(KpipeError, match="inherits itself"):
        load_config(tmp_path / "a.yaml", comp)


def test_missing_file_and_missing_competition(tmp_path: Path) -> None:
    with pytest.raises(KpipeError, match="not found"):
        load_config(tmp_path / "nope.yaml", None)
    with pytest.raises(KpipeError, match="no competition given"):
        load_config(None, None)


def test_config_is_frozen(comp: Path) -> None:
    cfg = load_config(None, comp)
    with pytest.raises(Exception, match="frozen"):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_resolved_config_round_trip(tmp_path: Path, comp: Path) -> None:
    cfg = load_config(None, comp, ["train.lr=0.5", "model.name=resnet18"])
    write_yaml(tmp_path / "run" / "config.yaml", cfg.to_dict())
    assert load_run_config(tmp_path / "run") == cfg


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    for exp in sorted((root / "exp").glob("*.yaml")):
        for comp in sorted((root / "competition").glob("*.yaml")):
            load_config(exp, comp)


def test_aug_is_a_preset_or_a_list_of_ops(comp: Path) -> None:
    assert load_config(None, comp, ["data.aug=medium"]).data.aug == "medium"
    assert load_config(None, comp, ["data.aug=hflip,rotate"]).data.aug == ["hflip", "rotate"]
    assert load_config(None, comp, ["data.aug=[hflip, color_jitter]"]).data.aug == ["hflip", "color_jitter"]
    assert load_config(None, comp, ["data.aug=grayscale"]).data.aug == ["grayscale"]
    assert load_config(None, comp, ["data.aug=[]"]).data.aug == []
    with pytest.raises(KpipeError, match=r"unknown augmentation 'rotat' \(did you mean 'rotate'\?\).*hflip"):
        load_config(None, comp, ["data.aug=hflip,rotat"])
    with pytest.raises(KpipeError, match="unknown augmentation 'medium'"):  # presets are not ops
        load_config(None, comp, ["data.aug=hflip,medium"])
    with pytest.raises(KpipeError, match="twice"):
        load_config(None, comp, ["data.aug=hflip,hflip"])
    with pytest.raises(KpipeError, match="data.hflip=false"):
        load_config(None, comp, ["data.aug=hflip", "data.hflip=false"])
    cfg = load_config(
        None,
        comp,
        [
            "data.aug=crop,hflip",
            "data.sampling=undersample",
            "model.kwargs={drop_path_rate: 0.1}",
            "model.init=kaiming",
        ],
    )
    assert validate(cfg.to_dict()) == cfg
