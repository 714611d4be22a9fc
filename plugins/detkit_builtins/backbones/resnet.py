"""ResNet50 backbone (He et al., 2016) cut after layer3, with layer4 as the RoI tail."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.resnet import Bottleneck

from detkit.interfaces import Features, RoITail, ShapeSpec

from detkit_builtins.backbones.common import (
    NORM_DESCRIPTION,
    FreezableBNBackbone,
    Norm,
    TailSequential,
    build_torchvision,
    check_pretrained_norm,
    fold_batchnorm,
    freeze_modules,
    legacy_freeze_bn,
    norm_layer,
    resolve_pretrained,
    stage_outputs,
)

WEIGHTS_FILE = "resnet50-0676ba61.pth"  # torchvision's ImageNet weights (IMAGENET1K_V1)
# Channels and strides of the multi-level outputs (layer1..layer4).
_C_SHAPES = {
    "C2": ShapeSpec(256, 4), "C3": ShapeSpec(512, 8), "C4": ShapeSpec(1024, 16), "C5": ShapeSpec(2048, 32),
}


def _move_stride_to_1x1(layer: nn.Sequential) -> None:
    """Put a down-sampling bottleneck's stride on its first 1x1 conv (the Caffe/MSRA layout)."""
    for block in layer:
        assert isinstance(block, Bottleneck)
        if block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


class ResNet50Backbone(FreezableBNBackbone):
    """``conv1 .. layer3`` of ResNet50: ``[N, 3, H, W] -> [N, 1024, ~H/16, ~W/16]``.

    The RoI tail is ``layer4`` + global average pooling on 14x14 pooled
    features: ``[R, 1024, 14, 14] -> [R, 2048]``; its normalisation follows
    ``norm``.  Stages for ``freeze_stages``: 1 = stem (conv1, bn1),
    2 = layer1, 3 = layer2, 4 = layer3.  ``norm: frozen_bn`` (the default:
    detection batches are too small for batch statistics) keeps every
    BatchNorm, the tail's included, in eval mode with frozen affine
    parameters; ``gn`` (GroupNorm) is the choice without ImageNet weights.
    ``stride_in_1x1`` and ``maxpool_ceil_mode``/``maxpool_padding``
    (``true``/``0`` in the faster-rcnn-pytorch layout) change only strides
    and padding, so torchvision's ImageNet weights load either way.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        pretrained: str | bool | None = None
        freeze_stages: int = Field(0, ge=0, le=5, description="5 (layer4) with out_features only")
        norm: Norm = Field("frozen_bn", description=NORM_DESCRIPTION)
        zero_init_residual: bool = Field(
            False,
            description="from scratch: start each residual block's last norm at 0, so every block "
            "begins as the identity (ignored with pretrained weights)",
        )
        stride_in_1x1: bool = False
        maxpool_ceil_mode: bool = False
        maxpool_padding: int = Field(1, ge=0, le=1)
        out_features: list[Literal["C2", "C3", "C4", "C5"]] | None = Field(
            None,
            description="multi-level output for a neck (FPN): the named stage outputs to return "
            "(C2..C5: layer1..layer4, strides 4..32); layer4 then joins the backbone and there is "
            "no RoI tail. null: one stride-16 map (layer3) with layer4 as the RoI tail",
        )

        @model_validator(mode="before")
        @classmethod
        def _old_freeze_bn(cls, data: Any) -> Any:
            return legacy_freeze_bn(data, "frozen_bn")

    out_channels = 1024
    stride = 16
    trunk_name = "features"  # the faster-rcnn-pytorch ``extractor`` Sequential

    def __init__(self, params: Params | None = None):
        super().__init__()
        p = self.params = params if params is not None else self.Params()
        check_pretrained_norm(p.pretrained, p.norm, "resnet50")
        path = resolve_pretrained(p.pretrained, WEIGHTS_FILE, "resnet50")
        make = lambda: resnet50(  # noqa: E731
            weights=None, norm_layer=norm_layer(p.norm), zero_init_residual=p.zero_init_residual
        )
        net = build_torchvision(make, path, "resnet50")
        if p.stride_in_1x1:
            for layer in (net.layer2, net.layer3, net.layer4):
                _move_stride_to_1x1(layer)
        net.maxpool = nn.MaxPool2d(3, stride=2, padding=p.maxpool_padding, ceil_mode=p.maxpool_ceil_mode)
        # Eval-mode (frozen) BatchNorms run inside their convs: no separate pass
        # over the activations, forward or backward (keys unchanged).
        fold_batchnorm(net)
        self.features = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3
        )
        self._out_features = list(p.out_features or [])
        if self._out_features:
            self.layer4 = net.layer4  # part of the trunk: C5 feeds the neck
        else:
            self._set_tail(TailSequential(net.layer4, nn.AdaptiveAvgPool2d(1)))
        if p.freeze_stages:
            self.freeze_stages(p.freeze_stages)
        if p.norm == "frozen_bn":
            self.freeze_bn()

    def forward(self, x: Tensor) -> Features:
        if not self._out_features:
            return self.features(x)
        x = self.features[:4](x)  # stem
        return stage_outputs(x, zip(("C2", "C3", "C4", "C5"), (*self.features[4:7], self.layer4)), self._out_features)

    def output_shape(self) -> dict[str, ShapeSpec] | None:
        if not self._out_features:
            return None
        return {n: _C_SHAPES[n] for n in ("C2", "C3", "C4", "C5") if n in self._out_features}

    def roi_tail(self) -> RoITail:
        if self._out_features:
            raise ValueError(
                "model.backbone.out_features: a multi-level resnet50 has no RoI tail (layer4 is in the "
                "trunk); use roi_head pooler multiscale_roi_align with box_head two_mlp"
            )
        return RoITail(self._tail, 14, 2048)

    def freeze_stages(self, n: int) -> None:
        """Freeze the stem (1), then layer1 (2), layer2 (3), layer3 (4), layer4 (5, multi-level only)."""
        stages = [self.features[0:2], self.features[4], self.features[5], self.features[6]]
        if self._out_features:
            stages.append(self.layer4)
        if not 0 <= n <= len(stages):
            raise ValueError(f"freeze_stages must be in 0..{len(stages)}, got {n}")
        freeze_modules(stages[:n])
