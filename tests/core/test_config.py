from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field

from detkit.config import apply_overrides, load_config, load_raw, merge, parse_override
from detkit.errors import ConfigError
from detkit.registry import BackboneSpec, ComponentSpec, registry


@pytest.fixture
def toy_plugins(clean_registry):
    """A toy detector/backbone/dataset/trainer so config tests do not need real models."""

    class Bb:
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            depth: int = Field(2, gt=0)

    class Det:
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            backbone: BackboneSpec = Field(default_factory=lambda: {"type": "toy_bb"}, validate_default=True)
            nms_iou: float = Field(0.3, gt=0, le=1)

    class Ds:
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            root: str = "."

    class Tr:
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")

    registry("backbone").add("toy_bb", Bb)
    registry("detector").add("toy_det", Det)
    registry("dataset").add("toy_ds", Ds)
    registry("trainer").add("toy_tr", Tr)


def write(path, text):
    path.write_text(text)
    return path


BASE = """
model: {type: toy_det, backbone: {type: toy_bb, depth: 4}}
data: {train: {type: toy_ds, root: /data}}
train: {epochs: 3, trainer: {type: toy_tr}}
"""


def test_valid_config_fills_defaults(tmp_path, toy_plugins):
    cfg = load_config(write(tmp_path / "a.yaml", BASE))
    assert isinstance(cfg.model, ComponentSpec)
    d = cfg.to_dict()
    assert d["model"] == {"type": "toy_det", "backbone": {"type": "toy_bb", "depth": 4}, "nms_iou": 0.3}
    assert d["train"]["epochs"] == 3 and d["train"]["optimizer"]["type"] == "sgd"


def test_typo_in_component_param_names_path_and_file(tmp_path, toy_plugins):
    path = write(tmp_path / "bad.yaml", BASE.replace("depth: 4", "dpeth: 4"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: model.backbone.dpeth: Extra inputs are not permitted"


def test_invalid_value_and_unknown_section(tmp_path, toy_plugins):
    path = write(tmp_path / "bad.yaml", BASE + "trian: {}\n")
    with pytest.raises(ConfigError, match=r"trian: Extra inputs are not permitted"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model\.nms_iou: Input should be less than or equal to 1"):
        load_config(write(tmp_path / "b.yaml", BASE), ["model.nms_iou=3"])


def test_unknown_component_type_suggests(tmp_path, toy_plugins):
    path = write(tmp_path / "bad.yaml", BASE.replace("toy_bb, depth", "toy_b, depth"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "model.backbone.type: unknown backbone 'toy_b'. Did you mean 'toy_bb'" in str(info.value)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "model: {type: x\ndata: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+:\d+: invalid YAML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_extends_merges_and_detects_cycles(tmp_path, toy_plugins):
    write(tmp_path / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain: {epochs: 9}\nmodel: {nms_iou: 0.5}\n")
    cfg = load_config(child)
    assert cfg.train.epochs == 9
    assert cfg.model.params.nms_iou == 0.5
    assert cfg.model.params.backbone.params.depth == 4  # kept from the base
    write(tmp_path / "x.yaml", "extends: y.yaml\n")
    write(tmp_path / "y.yaml", "extends: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_raw(tmp_path / "x.yaml")


def test_changing_a_component_type_drops_old_params():
    merged = merge({"backbone": {"type": "vgg16", "dropout": True}}, {"backbone": {"type": "resnet50"}})
    assert merged == {"backbone": {"type": "resnet50"}}


def test_overrides():
    assert parse_override("train.optimizer.lr=0.01") == (["train", "optimizer", "lr"], 0.01)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    data = apply_overrides({"train": {"epochs": 1}}, ["train.epochs=5", "eval.interval=0"])
    assert data == {"train": {"epochs": 5}, "eval": {"interval": 0}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="'train.epochs' is a int, not a section"):
        apply_overrides({"train": {"epochs": 1}}, ["train.epochs.x=1"])
