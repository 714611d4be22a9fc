from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field

from detkit.errors import PluginLoadError, RegistryError
from detkit.registry import ComponentSpec, ComponentValidationError, LossSpec, Registry, registry


class Widget:
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        size: int = Field(3, gt=0)
        name: str = "w"

    def __init__(self, params: "Widget.Params", **runtime):
        self.params, self.size, self.name, self.runtime = params, params.size, params.name, runtime


def test_build_validates_params_and_passes_runtime():
    reg = Registry("thing")
    reg.add("widget", Widget)
    w = reg.build({"type": "widget", "size": 7}, colour="red")
    assert (w.size, w.name, w.runtime) == (7, "w", {"colour": "red"})


def test_the_factory_gets_the_validated_params_instance_itself():
    # One constructor path, one validation: factory(params, **runtime) with the spec's own Params.
    reg = Registry("thing")
    reg.add("widget", Widget)
    spec = reg.validate({"type": "widget", "size": 5})
    assert reg.build(spec).params is spec.params


def test_an_error_inside_a_plugin_constructor_names_the_plugin():
    class Broken(Widget):
        def __init__(self, params, **runtime):
            raise ZeroDivisionError("boom")

    reg = Registry("thing")
    reg.add("broken", Broken)
    with pytest.raises(PluginLoadError, match=r"thing 'broken' from .*Broken.* failed while being built: "
                                              r"ZeroDivisionError: boom"):
        reg.build("broken")


def test_string_is_shorthand_for_type():
    reg = Registry("thing")
    reg.add("widget", Widget)
    assert reg.build("widget").size == 3


def test_invalid_param_reports_its_path():
    reg = Registry("thing")
    reg.add("widget", Widget)
    with pytest.raises(ComponentValidationError) as info:
        reg.validate({"type": "widget", "size": -1, "colour": 1})
    locs = sorted(loc for loc, _ in info.value.errors)
    assert locs == [("colour",), ("size",)]


def test_missing_type_lists_choices():
    reg = Registry("thing")
    reg.add("widget", Widget)
    with pytest.raises(ComponentValidationError, match="choose a thing: widget"):
        reg.validate({"size": 1})


def test_duplicate_name_names_both_providers():
    reg = Registry("thing")
    reg.add("widget", Widget)

    class Other(Widget):
        pass

    with pytest.raises(RegistryError) as info:
        reg.add("widget", Other)
    msg = str(info.value)
    assert "duplicate thing 'widget'" in msg
    assert "Widget" in msg and "Other" in msg


def test_unknown_name_suggests_close_matches_and_lists_installed():
    reg = Registry("thing")
    reg.add("widget", Widget)
    reg.add("gadget", Widget)
    with pytest.raises(RegistryError) as info:
        reg.get("widgte")
    msg = str(info.value)
    assert "Did you mean 'widget'" in msg
    assert "Installed things: gadget, widget" in msg


def test_factory_without_params_model_is_rejected():
    reg = Registry("thing")
    with pytest.raises(RegistryError, match="no parameter model"):
        reg.add("bare", lambda: None)


def test_runtime_argument_cannot_shadow_a_config_parameter():
    reg = Registry("thing")
    reg.add("widget", Widget)
    with pytest.raises(RegistryError, match="size is set by the program"):
        reg.build("widget", size=4)


def test_nested_components_are_validated_and_built_recursively(clean_registry):
    class Scaled:
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            factor: float = 1.0

        def __init__(self, params, *, base: float):
            self.value = params.factor * base

    class Holder:
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            inner: LossSpec = Field(default_factory=lambda: {"type": "scaled_test"}, validate_default=True)

        def __init__(self, params):
            assert isinstance(params.inner, ComponentSpec)
            self.inner = params.inner.build(base=10.0)  # the parent supplies run-time values

    registry("loss").add("scaled_test", Scaled)
    registry("detector").add("holder_test", Holder)
    built = registry("detector").build({"type": "holder_test", "inner": {"type": "scaled_test", "factor": 2.5}})
    assert built.inner.value == 25.0
    assert registry("detector").build("holder_test").inner.value == 10.0
    with pytest.raises(ComponentValidationError) as info:
        registry("detector").validate({"type": "holder_test", "inner": {"type": "scaled_test", "factr": 2}})
    assert [loc for loc, _ in info.value.errors] == [("inner", "factr")]
    spec = registry("detector").validate({"type": "holder_test", "inner": {"type": "scaled_test", "factor": 2}})
    assert spec.to_dict() == {"type": "holder_test", "inner": {"type": "scaled_test", "factor": 2.0}}


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(RegistryError, match="known kinds: backbone"):
        registry("bakbone")


def test_load_failure_is_recorded_and_raised_on_use():
    reg = Registry("thing")

    def explode():
        raise ImportError("needs libfoo")

    from detkit.registry import Provider

    entry = reg.add_lazy("broken", Provider("fake-dist", "1.2", "fake:Broken"), explode)
    with pytest.raises(PluginLoadError) as info:
        reg.get("broken")
    assert "fake-dist 1.2" in str(info.value) and "needs libfoo" in str(info.value)
    assert entry.status == "failed: ImportError: needs libfoo"


def test_role_narrows_a_kind():
    reg = Registry("thing")

    class Box(Widget):
        role = "box"

    class Cls(Widget):
        role = "classification"

    class Any_(Widget):  # declares no role: accepted in any slot
        pass

    reg.add("box", Box)
    reg.add("cls", Cls)
    reg.add("any", Any_)
    assert reg.validate("box", role="box").type == "box"
    assert reg.validate("any", role="box").type == "any"
    with pytest.raises(ComponentValidationError) as info:
        reg.validate({"type": "cls"}, role="box")
    assert info.value.errors == [
        (("type",), "thing 'cls' has the role 'classification'; this field takes the role 'box' (box)")
    ]
