"""The contracts between components.

Each kind of component is an abstract ``nn.Module`` (or a plain ABC for
datasets).  A plugin subclasses one of these, adds a pydantic ``Params`` class
attribute describing its config parameters, and declares an entry point in the
group ``detkit.<kind>``.

Shapes use: ``N`` images, ``A`` anchors per image, ``R`` RoIs in a batch,
``G`` ground-truth boxes of one image, ``C`` foreground classes.
Boxes are ``(x1, y1, x2, y2)`` in pixels of the network input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import Any, Mapping, NamedTuple, Sequence, Union

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


def freeze_batchnorm(module: nn.Module, freeze_affine: bool = True) -> None:
    """Put every BatchNorm in ``module`` in eval mode; optionally stop its affine gradients."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            if freeze_affine:
                for p in m.parameters():
                    p.requires_grad_(False)


class RoITail(NamedTuple):
    """The part of a backbone the RoI head runs on each pooled RoI.

    ``module`` maps ``[R, channels, roi_size, roi_size]`` to ``[R, out_features]``.
    """

    module: nn.Module
    roi_size: int
    out_features: int


class ShapeSpec(NamedTuple):
    """Channels and stride (input pixels per feature cell) of one feature map."""

    channels: int
    stride: int


# What a backbone or neck returns: one map, or named maps ordered finest first
# (``{"C2": ..., "C5": ...}``, ``{"P2": ..., "P6": ...}``).
Features = Union[Tensor, "dict[str, Tensor]"]


def is_multi_level(features: Any) -> bool:
    """True for named multi-level features (a mapping), False for one map."""
    return isinstance(features, Mapping)


class Backbone(nn.Module, ABC):
    """A feature extractor.

    Single map: ``[N, 3, H, W] -> [N, out_channels, h, w]`` at ``stride``.
    Multi-level (``output_shape()`` lists several maps): a dict of named maps,
    finest first, each with the channels and stride of its :class:`ShapeSpec`.
    """

    out_channels: int
    stride: int

    @abstractmethod
    def forward(self, x: Tensor) -> Features: ...

    def output_shape(self) -> dict[str, ShapeSpec] | None:
        """Named outputs and their shapes when ``forward`` returns a dict; ``None`` for one map."""
        return None

    @abstractmethod
    def roi_tail(self) -> RoITail:
        """The layers the RoI head reuses on pooled features (built once, then shared)."""

    def freeze_bn(self, freeze_affine: bool = True) -> None:
        """Keep BatchNorm statistics fixed (eval mode), optionally their affine weights too."""
        freeze_batchnorm(self, freeze_affine)

    def freeze_stages(self, n: int) -> None:
        """Stop gradients in the first ``n`` stages. Backbones override this."""
        if n:
            raise NotImplementedError(f"{type(self).__name__} does not support freeze_stages")


def check_backbone_output(backbone: nn.Module, name: str) -> None:
    """Check that ``backbone`` returns what it declares, before anything is trained.

    Compares the real output with ``out_channels``/``stride`` (one map) or
    ``output_shape()`` (named levels).  Two dry forwards on the meta device (no
    memory, no FLOPs), on inputs of 8 and 16 times the coarsest stride: the
    real stride is the growth of the input over the growth of the output, so
    padding conventions do not matter.  A mismatch raises a ConfigError whose
    one line names ``name`` (the plugin) and both values.
    """
    from detkit.errors import ConfigError

    shapes = backbone.output_shape() if hasattr(backbone, "output_shape") else None
    if shapes:
        declared = dict(shapes)
    else:
        declared = {"": ShapeSpec(int(getattr(backbone, "out_channels", 0)), int(getattr(backbone, "stride", 0)))}
    if any(s.channels <= 0 or s.stride <= 0 for s in declared.values()):
        raise ConfigError(f"{name}: declares no positive out_channels and stride (class attributes of a Backbone)")
    coarsest = max(s.stride for s in declared.values())
    sides = (8 * coarsest, 16 * coarsest)
    try:
        outs = [_meta_forward(backbone, side) for side in sides]
    except Exception as exc:  # noqa: BLE001 - any failure of a plugin's forward is reported as its own
        raise ConfigError(f"{name}: forward fails on a [1, 3, {sides[0]}, {sides[0]}] input: {exc}") from exc
    for level, spec in declared.items():
        label = f"{name}: output {level!r}" if level else name
        maps = []
        for out in outs:
            if level and not (is_multi_level(out) and level in out):
                raise ConfigError(f"{name}: output_shape() lists {level!r} but forward does not return it")
            if not level and is_multi_level(out):
                raise ConfigError(f"{name}: forward returns named maps {list(out)}; declare them in output_shape()")
            maps.append(out[level] if level else out)
        channels = int(maps[0].shape[1])
        if channels != spec.channels:
            attr = "output_shape()" if level else "out_channels"
            raise ConfigError(f"{label} has {channels} channels but its {attr} says {spec.channels}")
        grown = int(maps[1].shape[-1]) - int(maps[0].shape[-1])
        stride = (sides[1] - sides[0]) / grown if grown > 0 else float("inf")
        if abs(stride - spec.stride) > 0.1 * spec.stride:
            attr = "output_shape()" if level else "stride"
            raise ConfigError(f"{label} has stride {stride:g} (input px per feature cell) but its {attr} says {spec.stride}")


def _meta_forward(module: nn.Module, side: int) -> Any:
    state = {k: v.to("meta") for k, v in module.state_dict(keep_vars=True).items()}
    x = torch.empty(1, 3, side, side, device="meta")
    return torch.func.functional_call(module, state, (x,))


class RPNOutput(NamedTuple):
    """What a proposal generator returns for a batch.

    locs: ``[N, A, 4]`` predicted deltas; scores: ``[N, A, 2]`` logits
    (background, object); rois: ``[R, 4]`` proposals; roi_indices: ``[R]``
    int64 image index of each RoI; anchors: ``[A, 4]`` shared by the batch.
    """

    locs: Tensor
    scores: Tensor
    rois: Tensor
    roi_indices: Tensor
    anchors: Tensor


class Neck(nn.Module, ABC):
    """Maps features to features (e.g. a feature pyramid): ``dict[str, Tensor] -> dict[str, Tensor]``.

    Built with the ``input_shapes`` of what it receives; ``output_shape()``
    names what it returns, finest first.
    """

    @abstractmethod
    def forward(self, features: "dict[str, Tensor]") -> "dict[str, Tensor]": ...

    @abstractmethod
    def output_shape(self) -> dict[str, ShapeSpec]: ...


class ProposalGenerator(nn.Module, ABC):
    """Scores anchors and turns the best into proposals.

    ``features`` is one map or a dict of levels; with levels, ``locs``,
    ``scores`` and ``anchors`` of the :class:`RPNOutput` concatenate the
    levels in order, so target creators and losses see one anchor list.
    """

    @abstractmethod
    def forward(
        self, features: Features, image_sizes: Tensor, scale: float | Tensor = 1.0
    ) -> RPNOutput:
        """``image_sizes``: ``[N, 2]`` true (height, width) of each image in the padded batch."""


class RoIHead(nn.Module, ABC):
    """Classifies and refines RoIs: returns ``([R, (C+1)*4] deltas, [R, C+1] logits)``."""

    num_classes: int  # foreground classes; background is class 0 inside the head

    @abstractmethod
    def forward(
        self, features: Features, rois: Tensor, roi_indices: Tensor, input_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """``input_size``: (height, width) of the padded network input the RoIs refer to."""


class TargetCreator(nn.Module, ABC):
    """Turns ground truth into training targets. Holds no learnable parameters."""

    @abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> Any: ...


class MatchedBoxes:
    """The boxes behind a box loss's rows, for losses on boxes rather than deltas (IoU, GIoU).

    ``ref [M, 4]``: the anchor or proposal each row's deltas are relative to;
    ``target [M, 4]``: the target deltas (divided by ``std``); ``std [4]`` or
    ``None`` (the RPN).  ``gt`` is the matched ground-truth box of each row,
    recovered by decoding ``target`` on ``ref`` (computed on first use, so
    losses on deltas pay nothing); ``decode(pred)`` turns predicted deltas into
    boxes.  Boxes are in network-input pixels; rows with ``labels <= 0`` have
    no meaningful ``gt``.
    """

    def __init__(self, ref: Tensor, target: Tensor, std: Sequence[float] | Tensor | None = None):
        self.ref, self.target, self.std = ref, target, std
        self._gt: Tensor | None = None

    def decode(self, deltas: Tensor) -> Tensor:
        from detkit import boxes as box_ops

        return box_ops.decode(self.ref.float(), deltas.float(), self.std)

    @property
    def gt(self) -> Tensor:
        if self._gt is None:
            self._gt = self.decode(self.target.detach())
        return self._gt


class Loss(nn.Module, ABC):
    """A loss that returns a scalar tensor.

    The Faster R-CNN trainer calls a ``role = "classification"`` loss as
    ``loss(logits [M, K], labels [M])`` and a ``role = "box"`` loss as
    ``loss(pred [M, 4], target [M, 4], labels [M], boxes=MatchedBoxes)``:
    deltas, target deltas and the labels (``> 0`` foreground, ``0``
    background, ``-1`` ignored).  See docs/plugins.md.
    """

    @abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> Tensor: ...


class Detector(nn.Module, ABC):
    """A detector with a multi-mode ``forward`` and an end-to-end ``predict``.

    ``forward(x, mode="forward" | "extractor" | "rpn" | "head", ...)``; the last
    three are the pieces a trainer calls.  Besides ``forward`` and ``predict``,
    the engine calls only what is declared here: :meth:`backbone_parameters`
    (the frozen-backbone phase), :meth:`predict_input_size` (a check that
    training and ``predict`` resize alike) and :meth:`compile_modules`
    (``train.compile``).
    """

    num_classes: int

    @abstractmethod
    def forward(self, x: Tensor, mode: str = "forward", **kwargs: Any) -> Any: ...

    @abstractmethod
    def predict(
        self,
        images: Sequence[Tensor],
        score_thresh: float | None = None,
        nms_iou: float | None = None,
        resize: bool = True,
    ) -> list[dict[str, Tensor]]:
        """Per image: ``{"boxes": [K, 4], "scores": [K], "labels": [K] 0..C-1}``.

        ``images``: ``[3, H, W]`` tensors.  With ``resize=True`` the detector
        applies its own predict-time preprocessing (resize, normalise) and
        returns boxes in original-image pixels; ``resize=False`` takes images
        already at network-input size (what evaluation feeds from the data
        pipeline) and returns boxes in those pixels.  ``score_thresh``/``nms_iou``
        default to the detector's own.
        """

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The trunk parameters the frozen-backbone phase stops training.

        Excludes parameters the backbone shares with other parts (a RoI tail
        the head reuses), which keep training while the trunk is frozen.
        """
        raise NotImplementedError(f"{type(self).__name__} does not declare backbone_parameters()")

    def predict_input_size(self, height: int, width: int) -> tuple[int, int] | None:
        """The network-input ``(height, width)`` ``predict`` resizes a ``height x width`` image to.

        None when the detector does not resize (or cannot say).
        """
        return None

    def compile_modules(self) -> list[nn.Module]:
        """The sub-modules ``train.compile`` compiles in place (``nn.Module.compile``).

        Those that see the same kind of input every step (the backbone trunk, a
        RoI tail); none by default.
        """
        return []


class Trainer(nn.Module, ABC):
    """Holds a detector and its optimizer; computes named losses and takes steps.

    ``forward`` returns a ``dict[str, Tensor]`` of scalar losses; the key
    ``"total"`` is the one minimised, the others are logged under their names.
    The engine may wrap the trainer (``DistributedDataParallel``) and hands the
    wrapper to :meth:`train_step` as ``module``, so that the forward pass runs
    through it.  Mixed precision comes in as an :class:`detkit.engine.amp.Amp`.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    grad_clip: float | None = None  # max total gradient norm, None: no clipping

    @abstractmethod
    def forward(
        self,
        imgs: Tensor,
        bboxes: Sequence[Tensor],
        labels: Sequence[Tensor],
        scale: float | Tensor = 1.0,
        image_sizes: Tensor | None = None,
    ) -> dict[str, Tensor]: ...

    def train_step(
        self,
        imgs: Tensor,
        bboxes: Sequence[Tensor],
        labels: Sequence[Tensor],
        scale: float | Tensor = 1.0,
        image_sizes: Tensor | None = None,
        *,
        amp: Any = None,
        module: nn.Module | None = None,
        loss_scale: float = 1.0,
        zero_grad: bool = True,
        step: bool = True,
    ) -> dict[str, Tensor]:
        """One optimisation step (or one micro-step of an accumulated one); returns the losses, detached.

        ``module`` runs the forward pass (default ``self``; the engine passes its
        DDP wrapper).  The backward pass sees ``loss_scale * total`` (``1/N`` for
        ``N`` accumulated micro-batches).  ``zero_grad`` clears the gradients
        first; ``step`` unscales, clips to ``grad_clip`` and steps the optimizer.
        Gradient accumulation is ``zero_grad`` on the first micro-step and
        ``step`` on the last.  The mode (train/eval) is left as the caller set it.
        """
        if self.optimizer is None:
            raise RuntimeError(f"{type(self).__name__}.train_step needs an optimizer; build it with optimizer=...")
        if amp is None:
            from detkit.engine.amp import Amp

            amp = Amp(imgs.device, enabled=False)
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        with amp.autocast():
            losses = (module or self)(imgs, bboxes, labels, scale=scale, image_sizes=image_sizes)
        total = losses["total"]
        amp.backward(total * loss_scale if loss_scale != 1.0 else total)
        if step:
            if self.grad_clip is not None:
                amp.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
                params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            amp.step(self.optimizer)
        return {name: loss.detach() for name, loss in losses.items()}


class Transform(ABC):
    """One step of the data pipeline (``data.transforms``), run per sample in the loader's workers.

    ``__call__(image, target, rand) -> (image, target)``: ``image`` float32
    ``[3, H, W]`` in 0..1; ``target`` a dict whose ``"boxes"`` (float32 ``[G, 4]``
    xyxy in the current image's pixels) the step moves with the pixels; it may
    change other keys but not ``labels`` order.  ``rand`` holds ``random_draws``
    uniform numbers in [0, 1) in train mode (drawn from the sample's seeded
    generator, the same count whatever the step's options, so that one step
    never shifts another's draws), ``None`` in eval mode.  ``train_only`` steps
    (augmentations) are skipped in eval mode.  A step that changes the size in
    eval mode also implements :meth:`output_size` and :meth:`eval_boxes`, so
    annotations can be transformed without decoding the image.
    """

    random_draws: int = 0
    train_only: bool = False

    @abstractmethod
    def __call__(
        self, image: Tensor, target: dict[str, Any], rand: Tensor | None
    ) -> tuple[Tensor, dict[str, Any]]: ...

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The eval-mode output ``(height, width)`` of a ``height x width`` image (default: unchanged)."""
        return height, width

    def eval_boxes(self, boxes: Tensor, size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
        """Eval-mode boxes for an image going from ``size`` to ``new_size`` (default: unchanged)."""
        return boxes


class Hook:
    """A training hook (kind ``hook``): code the training loop calls at fixed points.

    Subclasses override the calls they need; all default to nothing.  The loop
    calls ``before_train``, then per epoch ``before_epoch``, per step
    ``before_step`` / ``after_step``, then ``after_epoch``, and at the end
    ``after_train`` (also when training failed; ``self.loop.completed`` says
    which).  Hooks run in ``priority`` order (lower first); ``self.loop`` is the
    running :class:`detkit.engine.train.TrainLoop`, set before ``before_train``.
    ``name`` keys the hook's ``state_dict`` in checkpoints (default: the class
    name).  See docs/engine.md for the built-in hooks and their priorities.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    priority: int = 50
    loop: Any

    @property
    def name(self) -> str:
        return type(self).__name__

    def before_train(self) -> None: ...

    def before_epoch(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def after_epoch(self) -> None: ...

    def after_train(self) -> None: ...

    def on_record(self, record: dict[str, Any]) -> None:
        """Called for every record the loop emits (``type`` "train", "eval", or a plugin's own)."""

    def eval_weights(self) -> Any:
        """A context manager under which the model holds the weights to evaluate and save."""
        return nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this hook exactly (empty: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DetectionDataset(torch.utils.data.Dataset, ABC):
    """A detection data set.

    ``dataset[i]`` returns ``(image, target)``: image float32 ``[3, H, W]`` in
    0..1 (RGB, before normalisation), target ``{"boxes": float32 [G, 4] xyxy
    pixels, "labels": int64 [G] in 0..C-1, "difficult": bool [G], "image_id":
    str}``.  ``classes`` names the C foreground classes in label order.
    """

    classes: Sequence[str]

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]: ...
