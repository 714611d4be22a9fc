"""The Faster R-CNN detector: preprocessing, backbone (+ neck), RPN and RoI head in one module."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torchvision.ops import batched_nms

from detkit import boxes as box_ops
from detkit.errors import ConfigError
from detkit.interfaces import (
    Detector, ImageBatch, RoIPredictions, ShapeSpec, Targets, check_backbone_output, is_multi_level,
)
from detkit.preprocess import ImagePreprocessor, PreprocessParams
from detkit.registry import BackboneSpec, NeckSpec, ProposalGeneratorSpec, RoIHeadSpec, registry
from detkit_builtins.backbones.common import TailSequential
from detkit_builtins.ops import group_and_cap


def _plugin_label(kind: str, spec: Any) -> str:
    """``model.<kind> '<name>' (<distribution> <version> (<target>))`` for messages about a plugin."""
    try:
        return f"model.{kind} '{spec.type}' ({registry(kind).get(spec.type).provider})"
    except Exception:  # noqa: BLE001 - only the message is at stake
        return f"model.{kind} '{spec.type}'"


class FasterRCNN(Detector):
    """Faster R-CNN (Ren et al., 2015) assembled from registered components.

    ``forward(images, targets)`` in train mode returns ``{"rpn_loc",
    "rpn_cls", "roi_loc", "roi_cls"}`` (each stage computes its own);
    ``forward(images)`` in eval mode returns per image ``{"boxes", "scores",
    "labels"}`` in the images' own pixels (see :class:`detkit.interfaces.Detector`).
    Module tree: ``preprocess``, ``backbone``, ``neck`` (or None), ``rpn``,
    ``roi_head``.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        backbone: BackboneSpec = Field(default_factory=lambda: {"type": "vgg16"}, validate_default=True)
        neck: NeckSpec | None = Field(
            None, description="maps multi-level backbone features to features (e.g. fpn); null: none"
        )
        rpn: ProposalGeneratorSpec = Field(default_factory=lambda: {"type": "rpn"}, validate_default=True)
        roi_head: RoIHeadSpec = Field(default_factory=lambda: {"type": "roi_head"}, validate_default=True)
        preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
        score_thresh: float = Field(0.5, ge=0.0, le=1.0)
        nms_iou: float = Field(0.3, gt=0.0, le=1.0)
        max_detections: int | None = Field(100, gt=0, description="per image; null = no cap")
        clip_detections: bool = Field(True, description="clip final boxes to the image")
        min_detection_size: float = Field(
            0.0, ge=0.0, description="drop detections narrower or lower than this (network-input px)"
        )
        channels_last: bool = Field(
            True,
            description="run the convolutions in channels-last memory format (faster on CPU with oneDNN, "
            "and the fast path for mixed precision on GPU); results are the same",
        )

    def __init__(self, params: Params, *, num_classes: int):
        super().__init__()
        p = self.params = params
        self.num_classes = num_classes
        self.score_thresh, self.nms_iou, self.max_detections = p.score_thresh, p.nms_iou, p.max_detections
        self.preprocess = ImagePreprocessor(p.preprocess)
        self.backbone = p.backbone.build()
        # A backbone whose real channels or stride differ from what it declares would
        # only fail deep inside the first step; one line naming the plugin instead.
        check_backbone_output(self.backbone, _plugin_label("backbone", p.backbone))
        shapes = self.backbone.output_shape()
        self.neck = p.neck.build(input_shapes=shapes or {}) if p.neck is not None else None
        if self.neck is not None:
            shapes = self.neck.output_shape()
        if shapes:  # multi-level: one channel count for the RPN's shared head, a stride per level
            channels = {s.channels for s in shapes.values()}
            if len(channels) != 1:
                raise ConfigError(
                    "model: the RPN runs one head on every level, but the levels have "
                    f"{sorted(channels)} channels; add a neck (e.g. fpn) that equalises them"
                )
            self.rpn = p.rpn.build(in_channels=channels.pop(), feat_stride=[s.stride for s in shapes.values()])
            self.roi_head = p.roi_head.build(num_classes=num_classes, input_shapes=dict(shapes))
        else:
            stride = int(self.backbone.stride)
            self.rpn = p.rpn.build(in_channels=self.backbone.out_channels, feat_stride=stride)
            try:
                tail = self.backbone.roi_tail()
            except NotImplementedError:  # no tail of its own: a box head that needs none (two_mlp) serves
                tail = None
            self.roi_head = p.roi_head.build(
                num_classes=num_classes,
                input_shapes={"features": ShapeSpec(self.backbone.out_channels, stride)},
                tail=tail,
            )
        self.multi_level = bool(shapes)
        self._feature_sizes: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.channels_last = p.channels_last
        if p.channels_last:
            # Only the memory layout of 4-d weights changes: values and state-dict keys do not.
            for module in (self.backbone, self.neck, self.rpn, self.roi_head):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
            for module in self.roi_head.modules():
                if isinstance(module, TailSequential):
                    module.channels_last = True  # pooled RoIs enter the tail in the same layout

    @property
    def device(self) -> torch.device:
        return self.preprocess.pixel_mean.device

    # ---------------------------------------------------------------- forward
    def features(self, x: Tensor) -> Any:
        """Backbone (and neck) features of a preprocessed batch: one map or a dict of levels."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        return self.neck(features) if self.neck is not None else features

    def forward(
        self, images: Sequence[Tensor], targets: Targets | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("in train mode the detector needs targets (model.eval() to detect)")
        batch, targets = self.preprocess(images, targets if self.training else None)
        features = self.features(batch.tensor)
        proposals, rpn_losses = self.rpn(features, batch, targets)
        predictions, roi_losses = self.roi_head(features, proposals, batch, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.postprocess(predictions, batch)

    # ----------------------------------------------------------- detections
    @contextmanager
    def detection_settings(
        self, score_thresh: float | None = None, nms_iou: float | None = None, max_detections: int | None = None
    ) -> Iterator[None]:
        saved = self.score_thresh, self.nms_iou, self.max_detections
        self.score_thresh = saved[0] if score_thresh is None else float(score_thresh)
        self.nms_iou = saved[1] if nms_iou is None else float(nms_iou)
        self.max_detections = saved[2] if max_detections is None else int(max_detections)
        try:
            yield
        finally:
            self.score_thresh, self.nms_iou, self.max_detections = saved

    def postprocess(self, predictions: RoIPredictions, batch: ImageBatch) -> list[dict[str, Tensor]]:
        """Clip, threshold and NMS per (image, class) in one ``batched_nms``; boxes to original pixels.

        Per image best first, at most ``max_detections``.  Only the final split
        per image reads ``N`` counts back to the host (none for one image, so
        the exported graph ends with the flat tensors).
        """
        boxes, probs, roi_indices = predictions
        r, c = probs.shape
        num_images = batch.tensor.shape[0]
        sizes = batch.image_sizes.to(boxes.dtype)[roi_indices]  # [R, 2] (h, w)
        if self.params.clip_detections:
            boxes = box_ops.clip(boxes, sizes[:, 0:1], sizes[:, 1:2])
        big_enough = None
        if self.params.min_detection_size > 0:  # judged in network-input pixels, as torchvision does
            m = self.params.min_detection_size
            big_enough = ((boxes[..., 2] - boxes[..., 0]) >= m) & ((boxes[..., 3] - boxes[..., 1]) >= m)
        # Back to original pixels: x by orig_w / input_w, y by orig_h / input_h.
        ratio = batch.orig_sizes.to(boxes.dtype)[roi_indices] / sizes  # [R, 2] (h, w)
        boxes = boxes * ratio.flip(1).repeat(1, 2).unsqueeze(1)
        labels = torch.arange(c, device=boxes.device).expand(r, c)
        image_idx = roi_indices.unsqueeze(1).expand(r, c)
        keep = probs > self.score_thresh
        if big_enough is not None:
            keep = keep & big_enough  # not &=: ONNX has no in-place and (aten::__iand__)
        boxes, scores, labels, image_idx = boxes[keep], probs[keep], labels[keep], image_idx[keep]
        keep = batched_nms(boxes, scores, image_idx * c + labels, self.nms_iou)  # best first
        keep, _, counts = group_and_cap(keep, image_idx, num_images, self.max_detections)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if num_images == 1:
            return [{"boxes": boxes, "scores": scores, "labels": labels}]
        splits = counts.tolist()
        return [
            {"boxes": b, "scores": s, "labels": l}
            for b, s, l in zip(boxes.split(splits), scores.split(splits), labels.split(splits))
        ]

    # ------------------------------------------------------ engine contract
    def feature_sizes(self, input_size: tuple[int, int]) -> list[tuple[int, int]]:
        """``(h, w)`` of each feature map the RPN sees for an ``(H, W)`` input, computed without data."""
        key = (int(input_size[0]), int(input_size[1]))
        if key not in self._feature_sizes:
            x: Any = torch.empty(1, 3, *key, device="meta")  # shape propagation only: no memory, no FLOPs
            for module in (self.backbone, self.neck):
                if module is not None:
                    state = {k: v.to("meta") for k, v in module.state_dict(keep_vars=True).items()}
                    x = torch.func.functional_call(module, state, (x,))
            maps = list(x.values()) if is_multi_level(x) else [x]
            self._feature_sizes[key] = [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]
        return self._feature_sizes[key]

    def anchors(self, input_size: tuple[int, int]) -> Tensor:
        """``[A, 4]`` anchors for an ``(H, W)`` network input, asked from the RPN (exactly those it scores)."""
        size = (int(input_size[0]), int(input_size[1]))
        return self.rpn.anchors(self.feature_sizes(size), size, self.device)

    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        """Trunk parameters: the backbone's, minus any it shares with the RoI head (its tail)."""
        shared = {id(p) for p in self.roi_head.parameters()}
        return [p for p in self.backbone.parameters() if id(p) not in shared]

    def compile_modules(self) -> list[torch.nn.Module]:
        """The backbone, the neck and what the RoI head names: the same shapes every step."""
        parts = [m for m in (self.backbone, self.neck) if isinstance(m, torch.nn.Module)]
        return parts + [m for m in self.roi_head.compile_modules() if all(m is not p for p in parts)]

    def import_state_dict(
        self, state_dict: Mapping[str, Tensor], source: str = "faster-rcnn-pytorch", new_classes: bool = False
    ) -> list[str]:
        """Load a ``faster-rcnn-pytorch`` or ``torchvision`` state dict (see :mod:`detkit_builtins.faster_rcnn_import`)."""
        from detkit_builtins.faster_rcnn_import import import_state_dict

        return import_state_dict(self, state_dict, source, new_classes)

    @classmethod
    def upgrade_checkpoint(
        cls, config: dict[str, Any], state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """A checkpoint of the earlier layout (``extractor``/``head``, losses in the trainer) in today's."""
        from detkit_builtins.faster_rcnn_import import upgrade_checkpoint

        return upgrade_checkpoint(config, state)
