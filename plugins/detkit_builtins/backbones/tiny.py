"""A small stride-16 backbone for tests, the CPU quickstart and training from scratch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from detkit.interfaces import Features, RoITail, ShapeSpec

from detkit_builtins.backbones.common import (
    NORM_DESCRIPTION,
    FreezableBNBackbone,
    Norm,
    TailSequential,
    freeze_modules,
    init_weights,
    legacy_freeze_bn,
    norm_layer,
    stage_outputs,
)


def _conv_norm_relu(cin: int, cout: int, stride: int, norm: Norm) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        norm_layer(norm)(cout),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(FreezableBNBackbone):
    """Four stride-2 stages of 3x3 conv + norm + ReLU: ``[N, 3, H, W] -> [N, channels[-1], H/16, W/16]``.

    A stage is one ``stages[i]`` block; ``freeze_stages(n)`` freezes the first
    ``n`` of them.  The RoI tail flattens ``[R, channels[-1], roi_size,
    roi_size]`` pooled features into one hidden Linear layer of ``tail_features``.
    With ``out_features`` it returns the named stage outputs instead
    (``C1``..``C4`` at strides 2..16) for a neck, and has no RoI tail.
    No pretrained weights exist for it.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256])
        tail_features: int = Field(256, gt=0)
        roi_size: int = Field(7, gt=0)
        blocks_per_stage: int = Field(
            1, ge=1, le=4, description="3x3 convs per stage (the first strided); more widens the receptive field"
        )
        freeze_stages: int = Field(0, ge=0, le=4)
        norm: Norm = Field("bn", description=NORM_DESCRIPTION)
        init: Literal["he", "pytorch"] = Field(
            "he", description="he: He (Kaiming) init as the reference detectors train from scratch; pytorch: "
            "PyTorch's layer defaults (smaller weights: with AdamW and a short schedule the relative updates are "
            "larger, which the 4-epoch quickstart recipe was tuned for)"
        )

        out_features: list[Literal["C1", "C2", "C3", "C4"]] | None = Field(
            None,
            description="multi-level output for a neck (FPN): the named stage outputs to return (C1..C4: "
            "strides 2..16); there is then no RoI tail (roi_head pooler multiscale_roi_align, box_head "
            "two_mlp). null: one stride-16 map with a one-layer RoI tail",
        )

        @field_validator("channels")
        @classmethod
        def _four_stages(cls, v: list[int]) -> list[int]:
            if len(v) != 4 or any(c <= 0 for c in v):
                raise ValueError("needs exactly 4 positive channel counts (one per stride-2 stage)")
            return v

        @model_validator(mode="before")
        @classmethod
        def _old_freeze_bn(cls, data: Any) -> Any:
            return legacy_freeze_bn(data, "bn")

    stride = 16

    def __init__(self, params: Params | None = None):
        super().__init__()
        p = self.params = params if params is not None else self.Params()
        channels = list(p.channels)
        self.out_channels = channels[-1]
        blocks, cin = [], 3
        for c in channels:
            layers = [_conv_norm_relu(cin, c, 2, p.norm)]
            layers += [_conv_norm_relu(c, c, 1, p.norm) for _ in range(p.blocks_per_stage - 1)]
            blocks.append(layers[0] if p.blocks_per_stage == 1 else nn.Sequential(*layers))
            cin = c
        self.stages = nn.Sequential(*blocks)
        self.roi_size = p.roi_size
        self.tail_features = p.tail_features
        names = ("C1", "C2", "C3", "C4")
        self._out_features = [n for n in names if n in (p.out_features or [])]
        self._shapes = {n: ShapeSpec(c, 2 ** (i + 1)) for i, (n, c) in enumerate(zip(names, channels))}
        if p.init == "he":
            init_weights(self.stages)
        if not self._out_features:
            tail = TailSequential(
                nn.Linear(channels[-1] * p.roi_size * p.roi_size, p.tail_features),
                nn.ReLU(inplace=True),
                flatten_input=True,
            )
            if p.init == "he":
                init_weights(tail)
            self._set_tail(tail)
        if p.freeze_stages:
            self.freeze_stages(p.freeze_stages)
        if p.norm == "frozen_bn":
            self.freeze_bn()

    def forward(self, x: Tensor) -> Features:
        if not self._out_features:
            return self.stages(x)
        return stage_outputs(x, zip(self._shapes, self.stages), self._out_features)

    def output_shape(self) -> dict[str, ShapeSpec] | None:
        if not self._out_features:
            return None
        return {n: self._shapes[n] for n in self._out_features}

    def roi_tail(self) -> RoITail:
        if self._out_features:
            raise ValueError(
                "model.backbone.out_features: a multi-level tiny backbone has no RoI tail; "
                "use roi_head pooler multiscale_roi_align with box_head two_mlp"
            )
        return RoITail(self._tail, self.roi_size, self.tail_features)

    def freeze_stages(self, n: int) -> None:
        """Freeze the first ``n`` of the 4 conv stages (0 = none)."""
        if not 0 <= n <= len(self.stages):
            raise ValueError(f"freeze_stages must be in 0..{len(self.stages)}, got {n}")
        freeze_modules(self.stages[:n])
