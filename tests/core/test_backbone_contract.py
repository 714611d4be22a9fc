"""A backbone whose real output differs from what it declares is refused when the detector is built, in one line."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict
from torch import nn

from detkit.errors import ConfigError
from detkit.interfaces import Backbone, RoITail, ShapeSpec, check_backbone_output
from detkit.plugins import Provider
from detkit.registry import registry


def make_backbone(channels: int, stride: int, declared_channels: int, declared_stride: int):
    class Lying(Backbone):
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")

        out_channels = declared_channels

        def __init__(self, params=None):
            super().__init__()
            self.stride = declared_stride
            # log2(stride) stride-2 convs: the real stride.
            layers, cin = [], 3
            for _ in range(stride.bit_length() - 1):
                layers += [nn.Conv2d(cin, channels, 3, stride=2, padding=1), nn.ReLU()]
                cin = channels
            self.body = nn.Sequential(*layers)

        def forward(self, x):
            return self.body(x)

        def roi_tail(self):
            return RoITail(nn.Sequential(nn.Flatten(), nn.Linear(declared_channels * 49, 16)), 7, 16)

    return Lying


@pytest.mark.parametrize(
    "real, declared, message",
    [
        ((64, 16), (32, 16), "has 64 channels but its out_channels says 32"),
        ((32, 32), (32, 16), "has stride 32 (input px per feature cell) but its stride says 16"),
    ],
)
def test_detector_build_names_the_lying_plugin(clean_registry, real, declared, message):
    provider = Provider("fake-backbones", "1.2.3", "fake_backbones:Lying")
    registry("backbone").add("lying", make_backbone(*real, *declared), provider=provider)
    with pytest.raises(ConfigError) as err:
        registry("detector").build(
            {"type": "faster_rcnn", "backbone": {"type": "lying"}, "rpn": {"type": "rpn", "mid_channels": 8}},
            num_classes=2,
        )
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("model.backbone 'lying' (fake-backbones 1.2.3 (fake_backbones:Lying))")
    assert message in msg


def test_honest_backbones_pass_and_multi_level_levels_are_checked():
    check_backbone_output(make_backbone(8, 16, 8, 16)(), "ok")  # no error

    class TwoLevels(nn.Module):
        def __init__(self, declared):
            super().__init__()
            self.declared = declared
            self.a = nn.Conv2d(3, 4, 3, stride=4, padding=1)
            self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)

        def output_shape(self):
            return self.declared

        def forward(self, x):
            a = self.a(x)
            return {"C2": a, "C3": self.b(a)}

    check_backbone_output(TwoLevels({"C2": ShapeSpec(4, 4), "C3": ShapeSpec(6, 8)}), "two")
    with pytest.raises(ConfigError, match=r"two: output 'C3' has stride 8 .* says 16"):
        check_backbone_output(TwoLevels({"C2": ShapeSpec(4, 4), "C3": ShapeSpec(6, 16)}), "two")
    with pytest.raises(ConfigError, match="lists 'C4' but forward does not return it"):
        check_backbone_output(TwoLevels({"C2": ShapeSpec(4, 4), "C4": ShapeSpec(6, 8)}), "two")
