"""The contracts between components.

Each kind of component is an abstract ``nn.Module`` (or a plain ABC for
datasets).  A plugin subclasses one of these, adds a pydantic ``Params`` class
attribute describing its config parameters, and declares an entry point in the
group ``detkit.<kind>``.

Shapes use: ``N`` images, ``A`` anchors per image, ``R`` RoIs in a batch,
``G`` ground-truth boxes of one image, ``C`` foreground classes.  Inside the
detector boxes are ``(x1, y1, x2, y2)`` in pixels of the network input; the
detector's own inputs and outputs are in the pixels of the images as given.
This module imports nothing of ``detkit.engine``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Iterable, Mapping, NamedTuple, Sequence, Union

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
        """The layers the RoI head reuses on pooled features (built once, then shared).

        Called once, when a one-map detector is built (never for multi-level
        features); a backbone without such layers raises ``NotImplementedError``
        and the config uses a box head that needs none (``two_mlp``).
        """

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

    shapes = backbone.output_shape()
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


class ImageBatch(NamedTuple):
    """A preprocessed batch, what the detector's stages see.

    ``tensor``: ``[N, 3, H, W]`` normalised, padded at the bottom and right;
    ``image_sizes``: int64 ``[N, 2]`` (h, w) of each resized image inside the
    padding; ``orig_sizes``: int64 ``[N, 2]`` (h, w) of each image as given;
    ``scales``: float32 ``[N]`` how much each image was enlarged.
    """

    tensor: Tensor
    image_sizes: Tensor
    orig_sizes: Tensor
    scales: Tensor

    @property
    def input_size(self) -> tuple[int, int]:
        """``(H, W)`` of the padded batch (traced values when exporting)."""
        return self.tensor.shape[-2], self.tensor.shape[-1]


# Per image ``{"boxes": float32 [G, 4] xyxy, "labels": int64 [G] in 0..C-1}``;
# in network-input pixels once the detector's preprocessing has resized them.
Targets = Sequence[Mapping[str, Tensor]]


class Proposals(NamedTuple):
    """Proposals of a batch: ``boxes [R, 4]`` in network-input pixels and the int64 ``image_indices [R]``."""

    boxes: Tensor
    image_indices: Tensor


class Neck(nn.Module, ABC):
    """Maps features to features (e.g. a feature pyramid): ``dict[str, Tensor] -> dict[str, Tensor]``.

    Built with the ``input_shapes`` of what it receives; ``output_shape()``
    names what it returns, finest first.
    """

    @abstractmethod
    def forward(self, features: "dict[str, Tensor]") -> "dict[str, Tensor]": ...

    @abstractmethod
    def output_shape(self) -> dict[str, ShapeSpec]: ...


class _Stage(nn.Module):
    """What the RPN and RoI-head contracts share: the random source of their target sampling."""

    # None: torch's global generator (saved in checkpoints); a trainer with a seed sets its own.
    generator: torch.Generator | None = None


class ProposalGenerator(_Stage, ABC):
    """Scores anchors, turns the best into proposals and, in training, computes its own losses.

    ``forward(features, images, targets=None) -> (proposals, losses)``:
    ``features`` is one map or a dict of levels; ``targets`` (train mode) are
    in network-input pixels.  ``losses`` is a dict of named scalars in train
    mode (``rpn_loc``, ``rpn_cls`` for the built-in), empty in eval mode.  The
    stage owns its anchor target creator and its losses (config slots).
    """

    @abstractmethod
    def forward(
        self, features: Features, images: ImageBatch, targets: Targets | None = None
    ) -> tuple[Proposals, dict[str, Tensor]]: ...

    @abstractmethod
    def anchors(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        input_size: tuple[int, int],
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """``[A, 4]`` anchors (levels concatenated) for feature maps of ``feature_sizes``."""


class Pooler(nn.Module, ABC):
    """Pools RoIs from features: ``(features, boxes [R, 4], image_indices [R], input_size) -> [R, C, s, s]``.

    Built with the ``input_shapes`` of the features (one entry for one map)
    and a ``required_size`` when the box head needs one (a backbone's RoI
    tail); ``output_size``/``out_channels`` say what it returns.
    """

    output_size: int
    out_channels: int

    @abstractmethod
    def forward(
        self, features: Features, boxes: Tensor, image_indices: Tensor, input_size: tuple[int, int]
    ) -> Tensor: ...


class BoxHead(nn.Module, ABC):
    """Per-RoI features: ``[R, C, s, s] -> [R, out_features]`` (two FC layers, a backbone's C4 tail)."""

    out_features: int

    @classmethod
    def input_size(cls, tail: RoITail | None) -> int | None:
        """The RoI side this head needs from the pooler, given the backbone's tail (``None``: any)."""
        return None

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor: ...


class RoIPredictions(NamedTuple):
    """A RoI head's inference output, before per-class NMS.

    ``boxes [R, C, 4]`` decoded per foreground class in network-input pixels,
    ``scores [R, C]`` foreground class probabilities, ``image_indices [R]``.
    """

    boxes: Tensor
    scores: Tensor
    image_indices: Tensor


class RoIHead(_Stage, ABC):
    """Classifies and refines proposals and, in training, samples them and computes its own losses.

    ``forward(features, proposals, images, targets=None) -> (predictions, losses)``:
    in eval mode :class:`RoIPredictions` and ``{}``; in train mode
    ``predictions`` may be ``None`` and ``losses`` holds named scalars
    (``roi_loc``, ``roi_cls`` for the built-in).  Background is class 0
    inside the head; ``num_classes`` counts the foreground classes.
    """

    num_classes: int

    @abstractmethod
    def forward(
        self, features: Features, proposals: Proposals, images: ImageBatch, targets: Targets | None = None
    ) -> tuple[RoIPredictions | None, dict[str, Tensor]]: ...

    def compile_modules(self) -> list[nn.Module]:
        """Submodules that see the same shapes every step (``train.compile`` compiles them); none by default."""
        return []


class TargetCreator(nn.Module, ABC):
    """Turns ground truth into training targets (no learnable parameters).

    ``role`` says which slot a creator fits: ``anchor`` (the RPN's) or
    ``proposal`` (the RoI head's); configs refuse one in the wrong slot.
    """

    role: str


class AnchorTargetCreatorBase(TargetCreator):
    """Labels anchors and gives their regression targets (the RPN's ``anchor_target`` slot)."""

    role = "anchor"

    @abstractmethod
    def forward(
        self,
        gt_boxes: Sequence[Tensor],
        anchors: Tensor,
        image_sizes: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``gt_boxes``: per image ``[G_i, 4]``; ``anchors [A, 4]``; ``image_sizes [N, 2]`` (h, w).

        Returns ``(loc_targets [N, A, 4], labels [N, A])`` with labels 1
        object, 0 background, -1 ignored.
        """


class SampledRoIs(NamedTuple):
    """RoIs chosen for training the head: ``boxes [S, 4]``, ``image_indices [S]``,
    ``loc_targets [S, 4]`` (divided by the std), ``labels [S]`` (0 background,
    ``c + 1`` class ``c``, -1 padding)."""

    boxes: Tensor
    image_indices: Tensor
    loc_targets: Tensor
    labels: Tensor


class ProposalTargetCreatorBase(TargetCreator):
    """Samples the RoIs the head trains on (the RoI head's ``proposal_target`` slot)."""

    role = "proposal"

    @abstractmethod
    def forward(
        self,
        rois: Tensor,
        roi_indices: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        loc_normalize_std: Sequence[float] | Tensor,
        generator: torch.Generator | None = None,
    ) -> SampledRoIs: ...


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
    """A loss returning a scalar tensor; ``role`` (``box`` or ``classification``) says which slots it fits."""

    role: str


class ClassificationLoss(Loss):
    """``loss(logits [M, K], labels [M]) -> scalar``; labels ``-1`` are ignored."""

    role = "classification"

    @abstractmethod
    def forward(self, logits: Tensor, labels: Tensor) -> Tensor: ...


class BoxLoss(Loss):
    """``loss(pred [M, 4], target [M, 4], labels [M], boxes=MatchedBoxes) -> scalar``.

    Deltas, target deltas and labels (``> 0`` foreground, ``0`` background,
    ``-1`` ignored); ``boxes`` gives the reference and matched boxes to losses
    on boxes (see docs/plugins.md).
    """

    role = "box"

    @abstractmethod
    def forward(self, pred: Tensor, target: Tensor, labels: Tensor, boxes: MatchedBoxes | None = None) -> Tensor: ...


class Detector(nn.Module, ABC):
    """A whole detector: one module, one forward, its preprocessing inside.

    ``detector.train(); losses = detector(images, targets)``: a dict of named
    scalar losses.  ``detector.eval(); detections = detector(images)``: per
    image ``{"boxes" float32 [K, 4] xyxy in the image's own pixels, "scores"
    [K], "labels" int64 [K] in 0..C-1}``, best first.  ``images``: ``[3, H,
    W]`` tensors of any sizes, uint8 or float 0..1; ``targets``: per image
    ``{"boxes" [G, 4] in the same pixels, "labels" [G]}``, ``G`` may be 0.
    The same forward runs in training, evaluation, ``predict`` and export.

    Besides ``forward``, the engine, export, import and statistics call only
    what is declared here.
    """

    num_classes: int
    preprocess: nn.Module  # resizes, normalises and pads (detkit.preprocess.ImagePreprocessor)

    @abstractmethod
    def forward(
        self, images: Sequence[Tensor], targets: Targets | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]: ...

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The network-input ``(h, w)`` an ``height x width`` image is resized to at inference."""
        return self.preprocess.output_size(height, width)

    @abstractmethod
    def detection_settings(
        self, score_thresh: float | None = None, nms_iou: float | None = None, max_detections: int | None = None
    ) -> AbstractContextManager:
        """A context in which inference uses these post-processing settings (``None``: the model's own)."""

    def anchors(self, input_size: tuple[int, int]) -> Tensor:
        """``[A, 4]`` anchors the proposal generator scores for an ``(H, W)`` network input."""
        raise NotImplementedError(f"{type(self).__name__} does not declare anchors()")

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The trunk parameters the frozen-backbone phase stops training.

        Excludes parameters the backbone shares with other parts (a RoI tail
        the head reuses), which keep training while the trunk is frozen.
        """
        raise NotImplementedError(f"{type(self).__name__} does not declare backbone_parameters()")

    def compile_modules(self) -> list[nn.Module]:
        """The sub-modules ``train.compile`` compiles in place (``nn.Module.compile``).

        Those that see the same kind of input every step (the backbone trunk, a
        RoI tail); none by default.
        """
        return []

    def set_sampling_generator(self, generator: torch.Generator | None) -> None:
        """Draw the stages' target sampling from ``generator`` (``None``: torch's global RNG)."""
        for module in self.modules():
            if isinstance(module, _Stage):
                module.generator = generator

    def import_state_dict(
        self, state_dict: Mapping[str, Tensor], source: str, new_classes: bool = False
    ) -> list[str]:
        """Load weights saved by another implementation (``source``); returns the keys left fresh.

        ``new_classes``: class-specific layers whose shapes differ keep their
        initialisation (fine-tuning to other classes).
        """
        from detkit.errors import CheckpointError

        raise CheckpointError(f"{type(self).__name__} cannot import {source} checkpoints")

    @classmethod
    def upgrade_checkpoint(
        cls, config: dict[str, Any], state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``(config, model state)`` of a checkpoint written by an earlier layout, in today's.

        Called when loading every detkit checkpoint; returns both unchanged when
        they are current (the default).
        """
        return config, dict(state)


class Trainer(ABC):
    """The optimisation step of a detector (kind ``trainer``), as detectron2's ``AMPTrainer.run_step``.

    Built with the ``model`` (a :class:`Detector`), its ``optimizer`` and
    ``amp`` (mixed precision on or off).  ``module`` is what the forward pass
    runs through: the model, or the engine's ``DistributedDataParallel``
    wrapper of it.  The training loop fetches batches and calls
    :meth:`run_step`; it owns nothing of the step.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    module: nn.Module

    @abstractmethod
    def run_step(self, micro_batches: Iterable[tuple[Sequence[Tensor], Targets]]) -> dict[str, Tensor]:
        """One optimizer step over one or more micro-batches (gradient accumulation).

        ``micro_batches`` with a ``len`` is iterated lazily (the engine fetches each
        batch as it is taken); any other iterable is gathered first.

        Returns the losses (the micro-batches' mean, detached) with ``"total"``.
        """

    def train_step(self, images: Sequence[Tensor], targets: Targets) -> dict[str, Tensor]:
        """One optimizer step on one batch."""
        return self.run_step([(images, targets)])

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the step exactly (scaler, generators)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Transform(ABC):
    """One augmentation step of the data pipeline (``data.transforms``), run per sample in the loader's workers.

    ``__call__(image, target, rand) -> (image, target)``: ``image`` float32
    ``[3, H, W]`` in 0..1 at the image's own size; ``target`` a dict whose
    ``"boxes"`` (float32 ``[G, 4]`` xyxy in the current image's pixels, a plain
    tensor) the step moves with the pixels; it may change other keys but not
    ``labels`` order.  A step may change the image's size (a crop, a
    zoom-out): the boxes are then in the new image's pixels.  A step may drop
    boxes (the cropping built-ins drop those a crop leaves degenerate); it then
    drops the same rows of every per-box key (``labels``, ``difficult``: see
    ``detkit.data.augment.sanitize``), and the pipeline counts them.  ``rand``
    holds ``random_draws`` uniform numbers in [0, 1) (drawn from the sample's
    seeded generator, the same count whatever the step's options, so that one
    step never shifts another's draws).  A step on ``torchvision.transforms.v2``
    subclasses ``detkit.data.augment.V2Step``, which seeds v2's global-RNG draws
    from ``rand``.  Steps run in training only: evaluation and ``predict`` see
    the images as read, and the detector's own preprocessing sets the input
    size.
    """

    random_draws: int = 0
    train_only: bool = True

    @abstractmethod
    def __call__(
        self, image: Tensor, target: dict[str, Any], rand: Tensor | None
    ) -> tuple[Tensor, dict[str, Any]]: ...


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

    def __init__(self, params: BaseModel | None = None):
        # Built as every component is: factory(params); a hook without parameters needs no __init__.
        self.params = params if params is not None else self.Params()

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

    def annotation(self, index: int) -> tuple[tuple[int, int], dict[str, Any]] | None:
        """``((height, width), target)`` of sample ``index`` without decoding its pixels, or ``None``
        when the data set cannot tell them apart from its image (then statistics and aspect-ratio
        grouping read the image, or do without)."""
        return None

    #: What ``root`` should name, for the one-line error when the first images are not there.
    root_hint: str = "the folder that holds the images"

    def first_image_paths(self) -> list[Any]:
        """The files of the first few annotated images, checked before training to catch a wrong
        ``root`` (:mod:`detkit.data.image_check`); empty (the default): nothing to check."""
        return []
