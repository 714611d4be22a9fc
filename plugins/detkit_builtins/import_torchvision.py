"""torchvision's detection weights in detkit's layout.

``fasterrcnn_resnet50_fpn`` (v1) maps one to one onto ``resnet50``
(``out_features: [C2, C3, C4, C5]``) + ``fpn`` + ``rpn`` + ``roi_head`` (``multiscale_roi_align`` + ``two_mlp``):

=====================================  =====================================
torchvision                            detkit
=====================================  =====================================
``backbone.body.conv1/bn1``            ``backbone.features.0/1``
``backbone.body.layer1..3``            ``backbone.features.4..6``
``backbone.body.layer4``               ``backbone.layer4``
``backbone.fpn.*``                     ``neck.*``
``rpn.head.conv.0.0``                  ``rpn.conv1``
``rpn.head.cls_logits`` (1 per anchor) ``rpn.score`` (2 per anchor)
``rpn.head.bbox_pred``                 ``rpn.loc``
``roi_heads.box_head.fc6/fc7``         ``roi_head.box_head.fc6/fc7``
``roi_heads.box_predictor.cls_score``  ``roi_head.score``
``roi_heads.box_predictor.bbox_pred``  ``roi_head.cls_loc``
=====================================  =====================================

``fasterrcnn_mobilenet_v3_large_fpn`` and ``_320_fpn`` map onto
``mobilenet_v3_large`` (``out_features: [stage4, stage5]``) + the same neck,
RPN and RoI head: ``backbone.body.<i>`` (``features[i]`` of torchvision's
MobileNetV3-Large) is ``backbone.features.<i>``; the rest is as above.

torchvision scores an anchor with one logit and a sigmoid; detkit with two
logits (background, object) and a softmax.  ``softmax([0, x])[1] ==
sigmoid(x)``, so the background channel gets zero weights and bias.
``FrozenBatchNorm2d`` files have no ``num_batches_tracked``: the model's own
(zero) counters are kept.

``fasterrcnn_resnet50_fpn_v2`` maps onto ``resnet50`` (``norm: bn``) + ``fpn``
(``norm: bn``) + ``rpn`` (``conv_depth: 2``) + ``roi_head``
(``multiscale_roi_align`` + ``conv_fc``): the same rules, plus the second RPN
conv ``rpn.head.conv.1.0`` -> ``rpn.conv2``.  Its normalised FPN blocks
(``inner_blocks.i.{0,1}``: conv, BatchNorm) and its ``FastRCNNConvFCHead``
(``box_head.0..3`` conv blocks, ``box_head.5`` the fc) have detkit's key
names already.
"""

from __future__ import annotations

import re
from typing import Mapping

from torch import Tensor

_RULES = [
    (r"^backbone\.body\.conv1\.", "backbone.features.0."),
    (r"^backbone\.body\.bn1\.", "backbone.features.1."),
    (r"^backbone\.body\.layer1\.", "backbone.features.4."),
    (r"^backbone\.body\.layer2\.", "backbone.features.5."),
    (r"^backbone\.body\.layer3\.", "backbone.features.6."),
    (r"^backbone\.body\.layer4\.", "backbone.layer4."),
    (r"^backbone\.fpn\.", "neck."),
    (r"^rpn\.head\.conv\.0\.0\.", "rpn.conv1."),
    (r"^rpn\.head\.cls_logits\.", "rpn.score."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.loc."),
    (r"^roi_heads\.box_head\.", "roi_head.box_head."),
    (r"^roi_heads\.box_predictor\.cls_score\.", "roi_head.score."),
    (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_head.cls_loc."),
    # fasterrcnn_resnet50_fpn_v2: RPNHead(conv_depth=2)
    (r"^rpn\.head\.conv\.1\.0\.", "rpn.conv2."),
    # fasterrcnn_mobilenet_v3_large_fpn / _320_fpn: the body is mobilenet_v3_large().features itself.
    *[(rf"^backbone\.body\.{i}\.", f"backbone.features.{i}.") for i in range(17)],
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]
_REVERSE = [(re.compile("^" + re.escape(r)), p[1:].replace("\\", "")) for p, r in _RULES]


def to_detkit(key: str) -> str | None:
    """The detkit key of a torchvision key, or ``None`` when no rule matches."""
    for pattern, repl in _COMPILED:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


def to_torchvision(key: str, used: set[int] | None = None) -> str:
    """The torchvision spelling of a detkit key (for error messages); ``used``: only those rules."""
    for i, (pattern, repl) in enumerate(_REVERSE):
        if (used is None or i in used) and pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def reverse_for(state: Mapping[str, Tensor]):
    """:func:`to_torchvision` with the rules that ``state``'s keys use (``backbone.features.4`` is
    ``layer1`` in a ResNet file and ``4`` in a MobileNet one); all rules when none match."""
    used = {i for key in state for i, (pattern, _) in enumerate(_COMPILED) if pattern.match(key)}
    return lambda key: to_torchvision(key, used or None)


def _two_logits(t: Tensor) -> Tensor:
    """``[A, ...]`` object logits -> ``[2A, ...]`` (background 0, object) pairs."""
    out = t.new_zeros((t.shape[0] * 2, *t.shape[1:]))
    out[1::2] = t
    return out


def map_state(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """``(mapped state, unmapped torchvision keys)``; counters the file lacks are filled from ``own``."""
    mapped: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        ours = to_detkit(key)
        if ours is None:
            unknown.append(key)
            continue
        if ours.startswith("rpn.score."):
            value = _two_logits(value)
        mapped[ours] = value
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = value  # FrozenBatchNorm2d has no counter
    return mapped, unknown


__all__ = ["map_state", "reverse_for", "to_detkit", "to_torchvision"]
