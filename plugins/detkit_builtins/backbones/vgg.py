"""VGG16 backbones (Simonyan & Zisserman, 2015) as used by Faster R-CNN, without and with BatchNorm."""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torchvision.models import vgg16, vgg16_bn

from detkit.interfaces import RoITail

from detkit_builtins.backbones.common import (
    NORM_DESCRIPTION,
    FreezableBNBackbone,
    Norm,
    TailSequential,
    build_torchvision,
    check_pretrained_norm,
    freeze_modules,
    init_weights,
    norm_layer,
    resolve_pretrained,
)

WEIGHTS_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet weights (IMAGENET1K_V1)
BN_WEIGHTS_FILE = "vgg16_bn-6c64b313.pth"  # torchvision's vgg16_bn ImageNet weights (IMAGENET1K_V1)


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
    # End (exclusive) of each of the 5 conv blocks in features[:30]; a block includes
    # the max-pool that follows it (the last one has none: it is dropped).
    stage_ends: tuple[int, ...] = (5, 10, 17, 24, 30)
    weights_file = WEIGHTS_FILE
    name = "vgg16"

    def __init__(self, params: Params | None = None):
        super().__init__()
        p = self.params = params if params is not None else self.Params()
        path = resolve_pretrained(p.pretrained, self.weights_file, self.name)
        net = build_torchvision(self._make(), path, self.name)
        self.features = net.features[: self.stage_ends[-1]]
        fc6, fc7 = net.classifier[0], net.classifier[3]
        layers: list[nn.Module] = [fc6, nn.ReLU(inplace=True)]
        layers += [nn.Dropout()] if p.dropout else []
        layers += [fc7, nn.ReLU(inplace=True)]
        layers += [nn.Dropout()] if p.dropout else []
        self._set_tail(TailSequential(*layers, flatten_input=True))
        if p.freeze_stages:
            self.freeze_stages(p.freeze_stages)

    def _make(self) -> Callable[[], nn.Module]:
        return lambda: vgg16(weights=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def roi_tail(self) -> RoITail:
        return RoITail(self._tail, 7, 4096)

    def freeze_stages(self, n: int) -> None:
        """Freeze the first ``n`` of the 5 conv blocks (0 = none)."""
        if not 0 <= n <= len(self.stage_ends):
            raise ValueError(f"freeze_stages must be in 0..{len(self.stage_ends)}, got {n}")
        if n:
            freeze_modules(self.features[: self.stage_ends[n - 1]])


class VGG16BNBackbone(VGG16Backbone):
    """``features[:43]`` of torchvision's ``vgg16_bn``: every conv followed by a norm layer.

    Shapes, tail and stages as :class:`VGG16Backbone`.  ``pretrained`` loads
    torchvision's ``vgg16_bn`` ImageNet file (BatchNorm statistics
    included), so it takes ``norm: frozen_bn``, ``bn`` or ``sync_bn``;
    ``gn`` puts GroupNorm in place of every BatchNorm, for training from scratch.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        pretrained: str | bool | None = None
        freeze_stages: int = Field(0, ge=0, le=5)
        dropout: bool = False
        norm: Norm = Field("frozen_bn", description=NORM_DESCRIPTION)

    trunk_name = None  # no faster-rcnn-pytorch checkpoint exists for it
    stage_ends = (7, 14, 24, 34, 43)
    weights_file = BN_WEIGHTS_FILE
    name = "vgg16_bn"

    def __init__(self, params: Params | None = None):
        p = params if params is not None else self.Params()
        check_pretrained_norm(p.pretrained, p.norm, self.name)
        super().__init__(p)
        if p.norm in ("sync_bn", "gn"):
            make = norm_layer(p.norm)
            for i, m in enumerate(self.features):
                if isinstance(m, nn.BatchNorm2d):
                    new = make(m.num_features)
                    if p.norm == "sync_bn":
                        new.load_state_dict(m.state_dict())  # keeps ImageNet statistics when loaded
                    else:
                        init_weights(new)
                    self.features[i] = new
            if p.freeze_stages:  # again: the new layers start trainable
                self.freeze_stages(p.freeze_stages)
        if p.norm == "frozen_bn":
            self.freeze_bn()

    def _make(self) -> Callable[[], nn.Module]:
        return lambda: vgg16_bn(weights=None)
