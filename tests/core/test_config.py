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

    class Wide:
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            width: int = Field(8, gt=0)

    registry("backbone").add("toy_bb", Bb)
    registry("backbone").add("toy_wide", Wide)
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


# ------------------------------------------------------------ broken files
def test_config_that_is_not_utf8_is_one_line_exit_2(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\ntrain: {epochs: 1}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_raw(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:1: not UTF-8") and "\n" not in msg
    assert info.value.exit_code == 2


def test_duplicate_yaml_keys_name_both_lines(tmp_path):
    path = write(tmp_path / "dup.yaml", "train:\n  epochs: 3\nmodel: {type: x}\ntrain:\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:4:1: invalid YAML: duplicate key 'train' on lines 1 and 4"):
        load_raw(path)
    nested = write(tmp_path / "nested.yaml", "train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match="duplicate key 'epochs' on lines 2 and 3"):
        load_raw(nested)
    # A merge key may be overridden: that is not a duplicate.
    ok = write(tmp_path / "merge.yaml", "a: &base {x: 1, y: 2}\nb:\n  <<: *base\n  x: 3\n")
    assert load_raw(ok)["b"] == {"x": 3, "y": 2}


# ---------------------------------------------------------- component types
def test_set_of_a_component_type_starts_from_the_new_types_defaults(tmp_path, toy_plugins):
    path = write(tmp_path / "a.yaml", BASE)
    cfg = load_config(path, ["model.backbone.type=toy_wide"])
    assert cfg.to_dict()["model"]["backbone"] == {"type": "toy_wide", "width": 8}
    # Parameters of the new type given on the command line are kept, in either order.
    for sets in (["model.backbone.width=3", "model.backbone.type=toy_wide"],
                 ["model.backbone.type=toy_wide", "model.backbone.width=3"]):
        assert load_config(path, sets).to_dict()["model"]["backbone"] == {"type": "toy_wide", "width": 3}
    # A whole component given with another type: its defaults too, not the old parameters.
    whole = load_config(path, ["model.backbone={type: toy_wide}"]).to_dict()["model"]["backbone"]
    assert whole == {"type": "toy_wide", "width": 8}
    # The same type again keeps the file's parameters.
    assert load_config(path, ["model.backbone.type=toy_bb"]).to_dict()["model"]["backbone"]["depth"] == 4


# ------------------------------------------------------- where errors point
def test_missing_extends_target_names_the_extending_file(tmp_path):
    child = write(tmp_path / "child.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_raw(child)
    msg = str(info.value)
    assert msg.startswith(f"{child}: 'extends: nowhere.yaml' names ") and "does not exist" in msg


def test_set_errors_are_blamed_on_the_set_not_the_file(tmp_path, toy_plugins):
    path = write(tmp_path / "a.yaml", BASE)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.nms_iou=7"])
    assert str(info.value).startswith("--set model.nms_iou=7: model.nms_iou: ")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.backbone={type: toy_bb, depth: -1}"])
    assert str(info.value).startswith("--set model.backbone={type: toy_bb, depth: -1}: model.backbone.depth")
    # A problem in the file itself still names the file.
    bad = write(tmp_path / "bad.yaml", BASE.replace("depth: 4", "depth: 0"))
    with pytest.raises(ConfigError) as info:
        load_config(bad, ["train.epochs=2"])
    assert str(info.value).startswith(f"{bad}: model.backbone.depth")
    # Mixed: the header names the file, the line from --set says so.
    with pytest.raises(ConfigError) as info:
        load_config(bad, ["model.nms_iou=7"])
    msg = str(info.value)
    assert msg.startswith(f"{bad} with --set overrides: 2 invalid fields")
    assert "model.nms_iou: " in msg and "(from --set model.nms_iou=7)" in msg


# ------------------------------------------------------- unknown keys everywhere
@pytest.mark.parametrize("override, path", [
    ("train.epoch=3", "train.epoch"),  # a typo of train.epochs
    ("train.loss_guard.max_los=1", "train.loss_guard.max_los"),
    ("train.ema={decay: 0.9, tua: 10}", "train.ema.tua"),
    ("eval.intervall=2", "eval.intervall"),
    ("data.batchsize=2", "data.batchsize"),
    ("model.nms_io=0.5", "model.nms_io"),
])
def test_an_unknown_key_in_any_section_is_an_error_naming_its_path(tmp_path, toy_plugins, override, path):
    # Silently ignored, a typo would train with the default instead of the value the user wrote.
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "a.yaml", BASE), [override])
    assert str(info.value) == f"--set {override}: {path}: Extra inputs are not permitted"
    assert info.value.exit_code == 2


def test_an_unknown_key_written_in_the_file_names_the_file(tmp_path, toy_plugins):
    written = write(tmp_path / "b.yaml", BASE + "eval: {intervall: 2}\n")
    with pytest.raises(ConfigError, match=rf"^{written}: eval\.intervall: Extra inputs are not permitted$"):
        load_config(written)


# ----------------------------------------------- the input size left data.transforms
PRESET = "model.preprocess"
MOVED = {
    "min_size: 300": ("min_size", f"the input size is set once, in {PRESET}.min_size (and {PRESET}.train_min_sizes "
                                  "for multi-scale training); move it there"),
    "max_size: 500": ("max_size", f"the input size is set once, in {PRESET}.max_size; move it there"),
    "scale_jitter: [0.8, 1.2]": ("scale_jitter", f"multi-scale training is set once, in {PRESET}.train_min_sizes"),
    "fixed_size: [300, 300]": ("fixed_size", f"the input size is set once, in {PRESET}.min_size and {PRESET}.max_size"),
}


@pytest.mark.parametrize("setting", list(MOVED))
def test_an_old_size_setting_under_data_transforms_is_one_line_naming_the_new_field(tmp_path, toy_plugins, setting):
    key, message = MOVED[setting]
    path = write(tmp_path / "old.yaml", BASE.replace("root: /data}", "root: /data}, transforms: {hflip: 0.5, "
                                                     + setting + "}"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: data.transforms.{key}: {message}") and "\n" not in msg
    assert info.value.exit_code == 2


def test_old_size_settings_from_set_and_in_the_list_form_are_one_line_too(tmp_path, toy_plugins):
    path = write(tmp_path / "a.yaml", BASE)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.transforms.min_size=300"])
    assert str(info.value) == (f"--set data.transforms.min_size=300: data.transforms.min_size: the input size is set "
                               f"once, in {PRESET}.min_size (and {PRESET}.train_min_sizes for multi-scale training); "
                               "move it there")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.transforms={min_size: 300, max_size: 500}"])
    msg = str(info.value)
    assert "data.transforms: min_size, max_size: the input size is set once, in model.preprocess" in msg
    assert "\n" not in msg
    steps = write(tmp_path / "steps.yaml", BASE.replace(
        "root: /data}", "root: /data}, transforms: [{type: hflip}, {type: resize, min_size: 600}]"))
    with pytest.raises(ConfigError) as info:
        load_config(steps)
    msg = str(info.value)
    assert msg.startswith(f"{steps}: data.transforms[1]: the resize step is gone: the input size is set once, "
                          f"in {PRESET}.min_size") and "\n" not in msg
    # Augmentations stay where they were, in both forms.
    assert load_config(path, ["data.transforms={hflip: 0.2, photometric: true}"]).data.transforms.hflip == 0.2
    assert load_config(path, ["data.transforms=[{type: hflip, p: 0.2}]"]).data.transforms[0].params.p == 0.2
