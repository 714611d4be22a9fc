"""Feature Pyramid Network (Lin et al., 2017) as a ``neck``.

The layout follows torchvision's ``FeaturePyramidNetwork`` +
``LastLevelMaxPool`` so that its detection weights map onto it one to one:
a 1x1 lateral conv per input level (``inner_blocks``), the top-down pathway
adding each coarser merged map upsampled by nearest-neighbour interpolation to
the next lateral, a 3x3 output conv per level (``layer_blocks``), and an extra
coarsest level that is a stride-2 subsampling (max-pool, kernel 1) of the
last output.  ``norm`` puts a normalisation layer after every conv (torchvision's
``fasterrcnn_resnet50_fpn_v2`` uses BatchNorm): each block is then conv (no
bias) + norm, in the same ``nn.Sequential`` slots, so the keys stay torchvision's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn import functional as F

from detkit.errors import ConfigError
from detkit.interfaces import Neck, ShapeSpec
from detkit_builtins.backbones.common import FrozenBNMixin, fold_batchnorm, norm_layer

NECK_NORMS = Literal["none", "bn", "frozen_bn", "sync_bn", "gn"]


def conv_norm(cin: int, cout: int, kernel: int, norm: str) -> nn.Sequential:
    """``Sequential(conv)`` with bias, or ``Sequential(conv without bias, norm)``: a norm's shift replaces the bias."""
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=norm == "none")
    return nn.Sequential(conv) if norm == "none" else nn.Sequential(conv, norm_layer(norm)(cout))


class FPN(FrozenBNMixin, Neck):
    """``{"C2".."C5"} -> {"P2".."P6"}``, every output ``out_channels`` wide.

    Input ``C<k>`` at stride ``s`` becomes ``P<k>`` at stride ``s``; with
    ``top_block: maxpool`` one more level ``P<k+1>`` at twice the coarsest
    stride is appended (used by the RPN only in torchvision's R50-FPN).
    Lateral and output convs start from He uniform (``a=1``) weights and zero
    bias, as in torchvision and Detectron; norm layers start at weight 1,
    bias 0.  ``norm: frozen_bn`` keeps its statistics and affine weights
    fixed through ``train()``; ``bn`` learns them.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        out_channels: int = Field(256, gt=0)
        in_features: list[str] | None = Field(
            None, description="backbone outputs to use, finest first; null: all of them"
        )
        top_block: Literal["maxpool", "none"] = Field(
            "maxpool", description="maxpool: add a stride-2 subsampled level after the coarsest (P6)"
        )
        norm: NECK_NORMS = Field(
            "none", description="after every lateral and output conv: none (convs with bias), bn "
            "(trainable BatchNorm, as torchvision's v2), frozen_bn (fixed statistics), sync_bn, gn (GroupNorm, 32 groups)"
        )

    def __init__(self, params: Params | None = None, *, input_shapes: dict[str, ShapeSpec]):
        super().__init__()
        p = self.params = params if params is not None else self.Params()
        if not input_shapes:
            raise ConfigError("model.neck: fpn needs a multi-level backbone (e.g. resnet50 with out_features)")
        names = list(p.in_features or input_shapes)
        missing = [n for n in names if n not in input_shapes]
        if missing:
            raise ConfigError(
                f"model.neck.in_features: {', '.join(missing)} not produced by the backbone "
                f"(it gives {', '.join(input_shapes)})"
            )
        self.in_features = names
        strides = [input_shapes[n].stride for n in names]
        # Equal strides are allowed: torchvision's MobileNetV3 FPN merges two stride-32 stages.
        if strides != sorted(strides):
            raise ConfigError(f"model.neck.in_features: levels must go finest first, got strides {strides}")
        self.inner_blocks = nn.ModuleList(conv_norm(input_shapes[n].channels, p.out_channels, 1, p.norm) for n in names)
        self.layer_blocks = nn.ModuleList(conv_norm(p.out_channels, p.out_channels, 3, p.norm) for _ in names)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Eval-mode BatchNorms run inside their convs (same keys, one pass fewer over the maps).
        fold_batchnorm(self)
        if p.norm == "frozen_bn":
            self.freeze_bn()
        # P<k> for C<k> (any other name: P + its position); the extra level continues the numbering.
        self.out_names = [("P" + n[1:]) if n[:1] == "C" and n[1:].isdigit() else f"P{i}" for i, n in enumerate(names)]
        self._shapes = {o: ShapeSpec(p.out_channels, s) for o, s in zip(self.out_names, strides)}
        self.top_block = p.top_block
        if p.top_block == "maxpool":
            last = self.out_names[-1]
            extra = "P" + str(int(last[1:]) + 1) if last[1:].isdigit() else "pool"
            self._shapes[extra] = ShapeSpec(p.out_channels, strides[-1] * 2)
            self.out_names.append(extra)

    def output_shape(self) -> dict[str, ShapeSpec]:
        return dict(self._shapes)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        xs = [features[n] for n in self.in_features]
        last = self.inner_blocks[-1](xs[-1])
        outs = [self.layer_blocks[-1](last)]
        for i in range(len(xs) - 2, -1, -1):
            lateral = self.inner_blocks[i](xs[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.layer_blocks[i](last))
        if self.top_block == "maxpool":
            outs.append(F.max_pool2d(outs[-1], 1, 2, 0))
        return dict(zip(self.out_names, outs))
