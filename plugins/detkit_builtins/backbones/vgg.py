"""VGG16 backbone (Simonyan & Zisserman, 2015) as used by Faster R-CNN."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torchvision.models import vgg16

from detkit.interfaces import RoITail

from detkit_builtins.backbones.common import (
    FreezableBNBackbone,
    TailSequential,
    freeze_modules,
    build_torchvision,
    resolve_pretrained,
)

WEIGHTS_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet weights (IMAGENET1K_V1)
# End (exclusive) of each of the 5 conv blocks in vgg16().features[:30]; a block
# includes the max-pool that follows it (the last one has none: it is dropped).
_STAGE_ENDS = (5, 10, 17, 24, 30)


class VGG16Backbone(FreezableBNBackbone):
    """``features[:30]`` of torchvision's VGG16: ``[N, 3, H, W] -> [N, 512, H/16, W/16]``.

    The RoI tail is VGG16's ``fc6 + ReLU + fc7 + ReLU`` (``dropout: true`` keeps
    its dropouts) on 7x7 pooled features: ``[R, 512, 7, 7] -> [R, 4096]``.
    A stage is one of the 5 conv blocks; ``freeze_stages: 2`` freezes
    conv1_1..conv2_2, as the original Faster R-CNN recipe does.
    ``pretrained``: a local torchvision ImageNet state-dict file, or ``true``
    for torchvision's cache; nothing is downloaded.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        pretrained: str | bool | None = None
        freeze_stages: int = Field(0, ge=0, le=5)
        dropout: bool = False

    out_channels = 512
    stride = 16
    trunk_name = "features"  # the faster-rcnn-pytorch ``extractor`` Sequential

    def __init__(self, pretrained: str | bool | None = None, freeze_stages: int = 0, dropout: bool = False):
        super().__init__()
        path = resolve_pretrained(pretrained, WEIGHTS_FILE, "vgg16")
        net = build_torchvision(lambda: vgg16(weights=None), path, "vgg16")
        self.features = net.features[:30]
        fc6, fc7 = net.classifier[0], net.classifier[3]
        layers: list[nn.Module] = [fc6, nn.ReLU(inplace=True)]
        layers += [nn.Dropout()] if dropout else []
        layers += [fc7, nn.ReLU(inplace=True)]
        layers += [nn.Dropout()] if dropout else []
        self._set_tail(TailSequential(*layers, flatten_input=True))
        if freeze_stages:
            self.freeze_stages(freeze_stages)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def roi_tail(self) -> RoITail:
        return RoITail(self._tail, 7, 4096)

    def freeze_stages(self, n: int) -> None:
        """Freeze the first ``n`` of the 5 conv blocks (0 = none)."""
        if not 0 <= n <= len(_STAGE_ENDS):
            raise ValueError(f"freeze_stages must be in 0..{len(_STAGE_ENDS)}, got {n}")
        if n:
            freeze_modules(self.features[: _STAGE_ENDS[n - 1]])
