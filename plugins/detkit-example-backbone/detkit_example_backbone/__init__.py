"""A ResNet-18 backbone for detkit, packaged the way any third party would."""

from __future__ import annotations

import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from detkit.errors import ConfigError
from detkit.interfaces import Backbone, RoITail

__all__ = ["ResNet18Backbone"]


class ResNet18Backbone(Backbone):
    """ResNet-18 conv1 ... layer3: ``[N, 3, H, W] -> [N, 256, H/16, W/16]``.

    The RoI tail runs ``layer4`` and global average pooling on 14x14 RoI
    features, giving 512 features per RoI.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        pretrained: str | None = Field(
            None, description="path to torchvision's ImageNet resnet18 state dict (.pth)"
        )
        freeze_stages: int = Field(0, ge=0, le=4, description="stem and layer1..3 count as stages 1..4")

    out_channels = 256
    stride = 16

    # The registry calls factory(params): the validated Params, nothing restated here.
    def __init__(self, params: "ResNet18Backbone.Params | None" = None):
        super().__init__()
        p = params if params is not None else self.Params()
        net = torchvision.models.resnet18(weights=None)
        if p.pretrained:
            try:
                state = torch.load(p.pretrained, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise ConfigError(f"model.backbone.pretrained: {p.pretrained}: file not found") from None
            net.load_state_dict(state)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.body = nn.Sequential(net.layer1, net.layer2, net.layer3)
        self._tail = nn.Sequential(net.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.freeze_stages(p.freeze_stages)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.stem(x))

    def roi_tail(self) -> RoITail:
        return RoITail(self._tail, roi_size=14, out_features=512)

    def freeze_stages(self, n: int) -> None:
        stages = [self.stem, *self.body]
        for stage in stages[:n]:
            for p in stage.parameters():
                p.requires_grad_(False)
