"""Transforms as plugins: the list form, its equivalence with the settings mapping, a third-party step."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from detkit.config import validate
from detkit.data.config import TransformConfig
from detkit.data.transforms import DetectionTransform, HorizontalFlip, Photometric
from detkit.errors import ConfigError
from detkit.interfaces import Transform
from detkit.registry import registry


@pytest.fixture
def image_and_target():
    image = torch.rand(3, 40, 60, generator=torch.Generator().manual_seed(0))
    target = {"boxes": torch.tensor([[0.0, 0, 10, 20], [30, 10, 60, 40]]), "labels": torch.tensor([0, 2])}
    return image, target


def test_builtins_are_registered_through_entry_points():
    assert {"hflip", "photometric"} <= set(registry("transform").names())
    assert registry("transform").get("hflip").provider.distribution == "detkit"


def test_the_list_form_equals_the_settings_mapping_sample_for_sample(image_and_target):
    image, target = image_and_target
    settings = TransformConfig(hflip=0.5, photometric=True)
    steps = [{"type": "hflip", "p": 0.5}, {"type": "photometric"}]
    a, b = DetectionTransform(settings, train=True), DetectionTransform(steps, train=True)
    flips = set()
    for seed in range(8):
        ia, ta = a(image, target, torch.Generator().manual_seed(seed))
        ib, tb = b(image, target, torch.Generator().manual_seed(seed))
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
        flips.add(bool(ta["boxes"][0, 0] > 0))
    assert flips == {True, False}  # both outcomes seen: the draws are really used


def test_steps_are_built_from_their_params_and_eval_mode_skips_them(image_and_target):
    image, target = image_and_target
    spec = registry("transform").validate({"type": "hflip", "p": 1.0})
    flip = spec.build()
    assert flip.p == 1.0 and HorizontalFlip().p == HorizontalFlip.Params().p  # defaults live in Params only
    t = DetectionTransform([flip, Photometric(Photometric.Params(brightness=0.5))], train=False)
    out, tgt = t(image, target)
    assert torch.equal(out, image) and torch.equal(tgt["boxes"], target["boxes"])  # not flipped
    out, tgt = DetectionTransform([flip], train=True)(image, target, torch.Generator().manual_seed(0))
    assert torch.equal(out, image.flip(-1))


class Invert(Transform):
    """A third-party step: 1 - pixels, in train mode with probability p."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        p: float = 1.0

    random_draws = 1
    train_only = True

    def __init__(self, params: "Invert.Params | None" = None):
        self.p = (params if params is not None else self.Params()).p

    def __call__(self, image, target, rand):
        if rand is not None and bool(rand[0] < self.p):
            image = 1 - image
        return image, target


class NoModel:
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")


def test_a_plugin_transform_from_the_config(clean_registry, image_and_target):
    registry("transform").register("invert")(Invert)
    registry("detector").register("no_model")(NoModel)  # the data section is under test, not a detector
    base = {"model": {"type": "no_model"},
            "data": {"train": {"type": "synthetic"},
                     "transforms": [{"type": "hflip", "p": 0.0}, {"type": "invert"}]}}
    cfg = validate(base, "x.yaml")
    image, target = image_and_target
    out, _ = DetectionTransform(cfg.data.transforms, train=True)(image, target, torch.Generator().manual_seed(0))
    assert torch.allclose(out, 1 - image)
    out, _ = DetectionTransform(cfg.data.transforms, train=False)(image, target)
    assert torch.equal(out, image)
    base["data"]["transforms"][1] = {"type": "invert", "q": 1}
    with pytest.raises(ConfigError, match=r"data\.transforms\.steps\[1\]\.q: Extra inputs"):
        validate(base, "x.yaml")
    base["data"]["transforms"] = {"hfilp": 0.5}
    with pytest.raises(ConfigError, match=r"data\.transforms\.settings\.hfilp: Extra inputs"):
        validate(base, "x.yaml")
