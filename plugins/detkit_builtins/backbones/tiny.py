"""A small stride-16 backbone for tests and the CPU quickstart."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from detkit.interfaces import RoITail

from detkit_builtins.backbones.common import FreezableBNBackbone, TailSequential, freeze_modules


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(FreezableBNBackbone):
    """Four stride-2 stages of 3x3 conv + BN + ReLU: ``[N, 3, H, W] -> [N, channels[-1], H/16, W/16]``.

    A stage is one ``stages[i]`` block; ``freeze_stages(n)`` freezes the first
    ``n`` of them.  The RoI tail flattens ``[R, channels[-1], roi_size,
    roi_size]`` pooled features into one hidden Linear layer of ``tail_features``.
    No pretrained weights exist for it: it is for tests and quick CPU runs.
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
        freeze_bn: bool = False

        @field_validator("channels")
        @classmethod
        def _four_stages(cls, v: list[int]) -> list[int]:
            if len(v) != 4 or any(c <= 0 for c in v):
                raise ValueError("needs exactly 4 positive channel counts (one per stride-2 stage)")
            return v

    stride = 16

    def __init__(
        self,
        channels: list[int] | tuple[int, ...] = (32, 64, 128, 256),
        tail_features: int = 256,
        roi_size: int = 7,
        freeze_stages: int = 0,
        freeze_bn: bool = False,
        blocks_per_stage: int = 1,
    ):
        super().__init__()
        channels = list(channels)
        self.out_channels = channels[-1]
        blocks, cin = [], 3
        for c in channels:
            layers = [_conv_bn_relu(cin, c, stride=2)]
            layers += [_conv_bn_relu(c, c, stride=1) for _ in range(blocks_per_stage - 1)]
            blocks.append(layers[0] if blocks_per_stage == 1 else nn.Sequential(*layers))
            cin = c
        self.stages = nn.Sequential(*blocks)
        self.roi_size = roi_size
        self.tail_features = tail_features
        self._set_tail(
            TailSequential(
                nn.Linear(channels[-1] * roi_size * roi_size, tail_features),
                nn.ReLU(inplace=True),
                flatten_input=True,
            )
        )
        if freeze_stages:
            self.freeze_stages(freeze_stages)
        if freeze_bn:
            self.freeze_bn()

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)

    def roi_tail(self) -> RoITail:
        return RoITail(self._tail, self.roi_size, self.tail_features)

    def freeze_stages(self, n: int) -> None:
        """Freeze the first ``n`` of the 4 conv stages (0 = none)."""
        if not 0 <= n <= len(self.stages):
            raise ValueError(f"freeze_stages must be in 0..{len(self.stages)}, got {n}")
        freeze_modules(self.stages[:n])
