"""MobileNetV3-Large backbone (Howard et al., 2019), single map or multi-level for an FPN."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large

from detkit.errors import ConfigError
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
)

WEIGHTS_FILE = "mobilenet_v3_large-8738ca79.pth"  # IMAGENET1K_V1, what torchvision's detection models start from
# torchvision's stages of ``features``: the stem and each block that opens a new stride, then the
# final 1x1 conv (its ``_mobilenet_extractor`` numbering); stage k is the output of features[index].
STAGE_INDEX = (0, 2, 4, 7, 13, 16)
_STAGE_SHAPES = (
    ShapeSpec(16, 2), ShapeSpec(24, 4), ShapeSpec(40, 8), ShapeSpec(80, 16), ShapeSpec(160, 32), ShapeSpec(960, 32),
)
STAGES = tuple(f"stage{k}" for k in range(len(STAGE_INDEX)))
# freeze_stages n freezes features[:FREEZE_BEFORE[n]] (torchvision's trainable_backbone_layers = 6 - n).
FREEZE_BEFORE = (*STAGE_INDEX, STAGE_INDEX[-1] + 1)
_ROI_SIZE = 7


class MobileNetV3LargeBackbone(FreezableBNBackbone):
    """torchvision's ``mobilenet_v3_large().features``: ``[N, 3, H, W] -> [N, 960, ~H/32, ~W/32]``.

    With ``out_features`` it returns the named stage outputs for a neck
    instead: ``stage0``..``stage5`` are ``features[0, 2, 4, 7, 13, 16]``
    (strides 2, 4, 8, 16, 32, 32; 16, 24, 40, 80, 160, 960 channels): each
    stage is read where its first, strided block ends, as torchvision's
    detection models do (they take ``[stage4, stage5]``, both at stride 32,
    into an FPN whose levels are then numbered P0, P1 and the max-pooled P2).
    Layers after the last requested stage are dropped.  The RoI tail only
    flattens the pooled map (no layers of its own: ``backbone_tail`` is then a
    linear classifier); the ``two_mlp`` box head is the usual choice, and with
    ``out_features`` there is no tail.  ``freeze_stages: n`` freezes
    ``features[:(0, 2, 4, 7, 13, 16, 17)[n]]`` (torchvision's
    ``trainable_backbone_layers = 6 - n``; its detection models: 3).
    ``norm: frozen_bn`` (the default) keeps every BatchNorm in eval mode with
    frozen affine weights, run inside its conv; ``bn`` trains them.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        pretrained: str | bool | None = Field(
            None, description=f"ImageNet weights: a torchvision-format file, or true for {WEIGHTS_FILE} "
            "(torchvision's cache, fetched through its weights API when missing)",
        )
        freeze_stages: int = Field(0, ge=0, le=6, description="freeze features[:(0, 2, 4, 7, 13, 16, 17)[n]]")
        norm: Norm = Field("frozen_bn", description=NORM_DESCRIPTION)
        bn_eps: float = Field(
            1e-5, gt=0, description="BatchNorm epsilon: 1e-5 as torchvision's detection models (their "
            "FrozenBatchNorm2d); its ImageNet classifier uses 0.001",
        )
        out_features: list[Literal[STAGES]] | None = Field(  # type: ignore[valid-type]
            None,
            description="multi-level output for a neck: the stages to return, finest first (torchvision's "
            "detection models: [stage4, stage5]); null: one stride-32 map of 960 channels",
        )

        @model_validator(mode="before")
        @classmethod
        def _old_freeze_bn(cls, data: Any) -> Any:
            return legacy_freeze_bn(data, "frozen_bn")

        @model_validator(mode="after")
        def _stages_in_order(self) -> "MobileNetV3LargeBackbone.Params":
            if self.out_features is not None:
                order = [STAGES.index(s) for s in self.out_features]
                if not order or order != sorted(set(order)):
                    raise ValueError("out_features: give distinct stages, finest first (e.g. [stage4, stage5])")
            return self

    out_channels = 960
    stride = 32

    def __init__(self, params: Params | None = None):
        super().__init__()
        p = self.params = params if params is not None else self.Params()
        check_pretrained_norm(p.pretrained, p.norm, "mobilenet_v3_large")
        path = resolve_pretrained(p.pretrained, WEIGHTS_FILE, "mobilenet_v3_large")
        net = build_torchvision(lambda: mobilenet_v3_large(weights=None, norm_layer=_norm(p)), path,
                                "mobilenet_v3_large")
        # Eval-mode (frozen) BatchNorms run inside their convs (keys unchanged).
        fold_batchnorm(net.features)
        self._stages = [STAGES.index(s) for s in p.out_features or []]
        last = STAGE_INDEX[self._stages[-1]] if self._stages else len(net.features) - 1
        self.features = net.features[: last + 1]  # the classifier and unused blocks are not kept
        self._outputs = {STAGE_INDEX[k]: STAGES[k] for k in self._stages}
        if not self._stages:
            self._set_tail(TailSequential(flatten_input=True))
        if p.freeze_stages:
            self.freeze_stages(p.freeze_stages)
        if p.norm == "frozen_bn":
            self.freeze_bn()

    def forward(self, x: Tensor) -> Features:
        if not self._outputs:
            return self.features(x)
        out: dict[str, Tensor] = {}
        for i, block in enumerate(self.features):
            x = block(x)
            name = self._outputs.get(i)
            if name is not None:
                out[name] = x
        return out

    def output_shape(self) -> dict[str, ShapeSpec] | None:
        if not self._stages:
            return None
        return {STAGES[k]: _STAGE_SHAPES[k] for k in self._stages}

    def roi_tail(self) -> RoITail:
        if self._stages:
            raise ConfigError(
                "model.roi_head.box_head: a multi-level mobilenet_v3_large has no RoI tail; use pooler "
                "multiscale_roi_align with box_head two_mlp"
            )
        return RoITail(self._tail, _ROI_SIZE, self.out_channels * _ROI_SIZE**2)

    def freeze_stages(self, n: int) -> None:
        """Freeze ``features[:(0, 2, 4, 7, 13, 16, 17)[n]]`` (stem first)."""
        if not 0 <= n < len(FREEZE_BEFORE):
            raise ValueError(f"freeze_stages must be in 0..{len(FREEZE_BEFORE) - 1}, got {n}")
        freeze_modules(self.features[: FREEZE_BEFORE[n]])


def _norm(p: MobileNetV3LargeBackbone.Params) -> Callable[[int], nn.Module]:
    """The normalisation factory torchvision's blocks call with a channel count, with ``bn_eps``."""
    if p.norm in ("frozen_bn", "bn"):
        return partial(nn.BatchNorm2d, eps=p.bn_eps)
    if p.norm == "sync_bn":
        return partial(nn.SyncBatchNorm, eps=p.bn_eps)
    return norm_layer(p.norm)
