"""Box heads (kind ``box_head``): per-RoI features from pooled RoIs, ``[R, C, s, s] -> [R, F]``.

* ``backbone_tail``: the backbone's own last stage (VGG16's fc6/fc7, ResNet50's
  layer4 + average pool), the C4 design of the original Faster R-CNN;
* ``two_mlp``: flatten, two fully connected layers (the FPN box head), with
  optional GroupNorm/BatchNorm for training from scratch;
* ``conv_fc``: 3x3 convs (+ norm) then fully connected layers (torchvision's
  ``FastRCNNConvFCHead`` of ``fasterrcnn_resnet50_fpn_v2``, Detectron's "4conv1fc").
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn import functional as F

from detkit.errors import ConfigError
from detkit.interfaces import BoxHead, RoITail
from detkit_builtins.backbones.common import FrozenBNMixin, fold_batchnorm
from detkit_builtins.necks.fpn import NECK_NORMS, conv_norm


class BackboneTail(BoxHead):
    """Runs the backbone's RoI tail (:meth:`detkit.interfaces.Backbone.roi_tail`) on each pooled RoI.

    The tail is registered here, so its weights appear once in the detector's
    state dict, as ``roi_head.box_head.tail.*``; the pooler's output size is
    the tail's ``roi_size``.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, params: Params, *, in_channels: int, roi_size: int, tail: RoITail | None = None):
        super().__init__()
        if tail is None:
            raise ConfigError(
                "model.roi_head.box_head: backbone_tail runs the backbone's RoI tail, and this backbone "
                "has none (multi-level features, or its roi_tail() raises NotImplementedError); use type two_mlp"
            )
        self.tail = tail.module
        self.out_features = tail.out_features

    @classmethod
    def input_size(cls, tail: RoITail | None) -> int | None:
        """The RoI side the tail takes (what the pooler must produce)."""
        return tail.roi_size if tail is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return self.tail(x)


class TwoMLPHead(BoxHead):
    """Flatten, ``fc6`` (+ norm) + ReLU, ``fc7`` (+ norm) + ReLU.

    ``norm``: ``none``, or ``gn`` (GroupNorm, 32 groups over the features of
    each RoI) / ``bn`` (BatchNorm over the RoIs of a batch) after each layer,
    for training from scratch.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        representation_size: int = Field(1024, gt=0, description="width of fc6 and fc7")
        norm: Literal["none", "gn", "bn"] = Field(
            "none", description="normalisation after fc6 and fc7: gn (GroupNorm, 32 groups) or bn"
        )

    def __init__(self, params: Params, *, in_channels: int, roi_size: int, tail: RoITail | None = None):
        super().__init__()
        hidden, norm = params.representation_size, params.norm
        self.fc6 = nn.Linear(in_channels * roi_size * roi_size, hidden, bias=norm == "none")
        self.fc7 = nn.Linear(hidden, hidden, bias=norm == "none")
        self.norm6, self.norm7 = (_fc_norm(norm, hidden) for _ in range(2))
        self.out_features = hidden

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm6(self.fc6(x.flatten(1))))
        return F.relu(self.norm7(self.fc7(x)))


class ConvFCHead(FrozenBNMixin, BoxHead):
    """``num_convs`` x (3x3 conv (+ norm) + ReLU), flatten, ``len(fc_dims)`` x (fc + ReLU).

    The children are one flat sequence numbered as torchvision's
    ``FastRCNNConvFCHead`` (conv blocks ``0..n-1``, each ``[conv, norm]``;
    the flatten at ``n``; fc ``i`` at ``n + 1 + 2i``), so its weights load by
    name.  Convs start He normal (``fan_out``), fc layers as PyTorch's default.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        num_convs: int = Field(4, ge=0, description="3x3 conv blocks before the fc layers")
        conv_channels: int = Field(256, gt=0)
        fc_dims: list[int] = Field([1024], min_length=1, description="width of each fc layer (each + ReLU)")
        norm: NECK_NORMS = Field(
            "bn", description="after each conv: bn (trainable BatchNorm, torchvision's v2), frozen_bn, sync_bn, "
            "gn (GroupNorm, 32 groups) or none (convs with bias)"
        )

    def __init__(self, params: Params, *, in_channels: int, roi_size: int, tail: RoITail | None = None):
        super().__init__()
        p = self.params = params
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(p.num_convs):
            block = conv_norm(channels, p.conv_channels, 3, p.norm)
            block.append(nn.ReLU(inplace=True))
            layers.append(block)
            channels = p.conv_channels
        layers.append(nn.Flatten())
        features = channels * roi_size * roi_size
        for dim in p.fc_dims:
            layers += [nn.Linear(features, dim), nn.ReLU(inplace=True)]
            features = dim
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.out_features = features
        fold_batchnorm(self)  # eval-mode BatchNorms run inside their convs
        if p.norm == "frozen_bn":
            self.freeze_bn()

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.children():
            x = layer(x)
        return x


def _fc_norm(norm: str, features: int) -> nn.Module:
    if norm == "gn":
        return nn.GroupNorm(math.gcd(32, features), features)
    if norm == "bn":
        return nn.BatchNorm1d(features)
    return nn.Identity()
