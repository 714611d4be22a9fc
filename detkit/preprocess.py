"""The detector's preprocessing: resize, normalise and pad, inside the model.

:class:`ImagePreprocessor` is the one place the network input size is set
(``model.preprocess``), and the one code path that turns images into a
batch, in training, evaluation, ``predict`` and export alike, as torchvision's
``GeneralizedRCNNTransform``.  Per image: uint8 becomes float 0..1,
``(x - mean) / std``, resize to :meth:`ImagePreprocessor.output_size` with
one interpolation (``resample``, ``antialias``) on those float pixels; then
the batch is padded at the bottom and right to a multiple of
``size_divisible``.  In train mode the short side is drawn per image from
``train_min_sizes`` (multi-scale training) and the targets' boxes are scaled
with their image.

``backend: pil`` instead resizes the 8-bit image exactly as Pillow does
(rounded to 8 bits, then normalised): the pipeline of checkpoints trained
that way (faster-rcnn-pytorch).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from detkit.interfaces import ImageBatch
from detkit.resize import resize_float, resize_shape, resize_uint8, resized_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Inputs beyond this side are a typo (6000 for 600), not a plan: an 8k x 8k VGG16 input needs ~1 TB.
MAX_INPUT_SIDE = 4096


class PreprocessParams(BaseModel):
    """``model.preprocess``: the network input size and how images get there.

    The shorter side becomes ``min_size`` (in training: one of
    ``train_min_sizes`` per image, drawn at random) and the longer side is
    scaled by the same factor; when that would exceed ``max_size`` the longer
    side becomes ``max_size`` instead (``null``: no cap).  ``rounding``:
    ``round``, ``floor`` (torchvision) or ``truncate`` (faster-rcnn-pytorch).
    """

    model_config = ConfigDict(extra="forbid")

    min_size: int = Field(600, gt=0, le=MAX_INPUT_SIDE, description="short side at evaluation and predict (px)")
    max_size: int | None = Field(1000, gt=0, le=MAX_INPUT_SIDE, description="cap on the long side (px); null: none")
    train_min_sizes: list[int] | None = Field(
        None, min_length=1,
        description="short sides for multi-scale training, one drawn per image; null: min_size",
    )
    resample: Literal["bilinear", "bicubic"] = "bilinear"
    antialias: bool = Field(False, description="antialiased resize (a low-pass filter when shrinking)")
    backend: Literal["torch", "pil"] = Field(
        "torch", description="torch: resize float pixels; pil: resize the 8-bit image exactly as Pillow does"
    )
    rounding: Literal["round", "floor", "truncate"] = "round"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size_divisible: int = Field(1, gt=0, description="pad the batch to a multiple of this (FPN: 32)")
    pad: Literal["zero", "mean"] = Field(
        "zero", description="pad with black (zero) or with the mean colour (zeros after normalising)"
    )

    @model_validator(mode="after")
    def _sizes(self) -> "PreprocessParams":
        sizes = [self.min_size, *(self.train_min_sizes or [])]
        if any(not 0 < s <= MAX_INPUT_SIDE for s in sizes):
            raise ValueError(f"train_min_sizes {self.train_min_sizes}: each must be in 1..{MAX_INPUT_SIDE}")
        if self.max_size is not None and self.max_size < self.min_size:
            raise ValueError(f"max_size {self.max_size} is smaller than min_size {self.min_size}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std {self.std}: every value must be > 0")
        return self


class ImagePreprocessor(nn.Module):
    """``forward(images, targets=None) -> (ImageBatch, targets)``: see the module docstring.

    ``images``: ``[3, H, W]`` (or ``[H, W]``, ``[1, H, W]``, ``[4, H, W]``)
    uint8 or float 0..1 tensors of any sizes; ``targets``: per image
    ``{"boxes" [G, 4], "labels" [G], ...}`` in the images' pixels, returned
    with ``boxes`` in network-input pixels (other keys kept).
    """

    def __init__(self, params: PreprocessParams | Mapping[str, Any] | None = None):
        super().__init__()
        if not isinstance(params, PreprocessParams):
            params = PreprocessParams.model_validate(dict(params or {}))
        self.params = params
        # Non-persistent: they come from the config, not from trained weights.
        self.register_buffer("pixel_mean", torch.tensor(params.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(params.std).view(3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        p = self.params
        return (f"min_size={p.min_size}, max_size={p.max_size}, train_min_sizes={p.train_min_sizes}, "
                f"resample={p.resample}, antialias={p.antialias}, backend={p.backend}")

    # ------------------------------------------------------------------ sizes
    def output_size(self, height: int, width: int, min_size: int | None = None) -> tuple[int, int]:
        """The network-input ``(h, w)`` of a ``height x width`` image (short side ``min_size``)."""
        p = self.params
        return resize_shape(height, width, min_size or p.min_size, p.max_size, p.rounding)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """What one ``height x width`` image becomes alone: :meth:`output_size`, padded up to ``size_divisible``."""
        h, w = self.output_size(height, width)
        return _round_up(h, self.params.size_divisible), _round_up(w, self.params.size_divisible)

    def _target_size(self, image: Tensor) -> tuple[Any, Any]:
        p = self.params
        h, w = image.shape[-2], image.shape[-1]
        if torch.jit.is_tracing():  # sizes are traced values: compute them in the graph
            h, w = _traced(h, image), _traced(w, image)
            return resized_size(h, w, p.min_size, p.max_size, p.rounding)
        min_size = p.min_size
        if self.training and p.train_min_sizes:
            sizes = p.train_min_sizes
            # torch's CPU generator (saved in checkpoints), not the model's device: no sync.
            min_size = sizes[int(torch.randint(len(sizes), (1,)))] if len(sizes) > 1 else sizes[0]
        return self.output_size(int(h), int(w), min_size)

    # ----------------------------------------------------------------- images
    def prepare(self, image: Tensor) -> Tensor:
        """Any accepted image as ``[3, H, W]`` of its own dtype (grey repeated, alpha dropped)."""
        if image.dim() == 2:
            image = image.unsqueeze(0)
        if image.dim() != 3:
            raise ValueError(f"expected a [3, H, W] image, got shape {tuple(image.shape)}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        elif image.shape[0] == 4:  # RGBA: drop alpha as PIL's convert("RGB") does
            image = image[:3]
        if image.shape[0] != 3:
            raise ValueError(f"expected a [3, H, W] image, got shape {tuple(image.shape)}")
        return image

    def resize_image(self, image: Tensor, size: tuple[Any, Any]) -> Tensor:
        """``[3, H, W]`` uint8/float -> normalised float32 ``[3, h, w]``."""
        p = self.params
        mean, std = self.pixel_mean, self.pixel_std
        if p.backend == "pil":
            if image.dtype != torch.uint8:
                image = image.float().mul(255.0).round().clamp(0, 255).to(torch.uint8)
            h, w = (s if isinstance(s, Tensor) else torch.tensor(s, device=image.device) for s in size)
            x = resize_uint8(image, h, w, p.resample) / 255.0
            return (x - mean) / std
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        x = (x - mean) / std  # then resize: torchvision's order
        if not _same_size(x, size):
            x = resize_float(x, size[0], size[1], p.resample, p.antialias)
            if p.resample == "bicubic":  # bicubic overshoots: keep it inside the 0..1 pixel range
                x = torch.maximum(torch.minimum(x, (1.0 - mean) / std), -mean / std)
        return x

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> tuple[ImageBatch, list[dict[str, Tensor]] | None]:
        if len(images) == 0:
            raise ValueError("the detector needs at least one image")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        device = self.pixel_mean.device
        prepared = [self.prepare(image.to(device)) for image in images]
        sizes = [self._target_size(image) for image in prepared]
        orig = [(image.shape[-2], image.shape[-1]) for image in prepared]
        if torch.jit.is_tracing():
            if len(prepared) != 1:
                raise ValueError("an exported detector takes one image")
            resized = [self.resize_image(prepared[0], sizes[0])]
            batch = self._pad_one(resized[0])
        elif self.params.backend == "torch" and all(_same_size(x, s) for x, s in zip(prepared, sizes)):
            # Nothing to resize: pad the pixels, then normalise the batch at once (elementwise, so
            # every value equals the per-image path's).
            resized = [x.float() / 255.0 if x.dtype == torch.uint8 else x.float() for x in prepared]
            batch = (self._pad(resized, pixels=True) - self.pixel_mean) / self.pixel_std
        else:
            resized = [self.resize_image(x, s) for x, s in zip(prepared, sizes)]
            batch = self._pad(resized)
        out_targets = []
        for i, t in enumerate(targets or ()):
            t = dict(t)
            boxes = t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
            (h, w), x = orig[i], resized[i]
            if (x.shape[-2], x.shape[-1]) != (h, w):
                sx, sy = x.shape[-1] / w, x.shape[-2] / h
                boxes = boxes * boxes.new_tensor([sx, sy, sx, sy])
            t["boxes"] = boxes
            t["labels"] = t["labels"].to(device=device, dtype=torch.int64).reshape(-1)
            out_targets.append(t)
        image_sizes = _sizes_tensor([(x.shape[-2], x.shape[-1]) for x in resized], device)
        orig_sizes = _sizes_tensor(orig, device)
        scales = (image_sizes.to(torch.float32) / orig_sizes.to(torch.float32)).prod(dim=1).sqrt()
        return ImageBatch(batch, image_sizes, orig_sizes, scales), (out_targets if targets is not None else None)

    def _pad_value(self) -> Tensor:
        """Per channel: zeros after normalising (mean colour) or black."""
        if self.params.pad == "mean":
            return torch.zeros_like(self.pixel_mean)
        return -self.pixel_mean / self.pixel_std

    def _pad(self, images: list[Tensor], pixels: bool = False) -> Tensor:
        """Stack into ``[N, 3, H, W]`` padded at the bottom/right; ``pixels``: images not yet normalised."""
        d = self.params.size_divisible
        height = _round_up(max(int(x.shape[-2]) for x in images), d)
        width = _round_up(max(int(x.shape[-1]) for x in images), d)
        if all((x.shape[-2], x.shape[-1]) == (height, width) for x in images):
            return torch.stack(images)
        if pixels:  # float 0..1 pixels: the one whose normalised value is the pad value
            value = self.pixel_mean if self.params.pad == "mean" else torch.zeros_like(self.pixel_mean)
        else:
            value = self._pad_value()
        out = value.expand(len(images), 3, height, width).clone()
        for i, x in enumerate(images):
            out[i, :, : x.shape[-2], : x.shape[-1]].copy_(x)
        return out

    def _pad_one(self, x: Tensor) -> Tensor:
        """Traceable padding of one image to a multiple of ``size_divisible``."""
        d = self.params.size_divisible
        if d == 1:
            return x.unsqueeze(0)
        h, w = _traced(x.shape[-2], x), _traced(x.shape[-1], x)
        pad_h, pad_w = (d - h % d) % d, (d - w % d) % d
        value = self._pad_value()
        x = x - value  # pad with zeros around the shifted image, then shift back
        x = torch.nn.functional.pad(x.unsqueeze(0), [0, pad_w, 0, pad_h])
        return x + value


def _round_up(size: int, multiple: int) -> int:
    return -(-int(size) // multiple) * multiple


def _traced(size: Any, like: Tensor) -> Tensor:
    return size if isinstance(size, Tensor) else torch.tensor(size, dtype=torch.int64, device=like.device)


def _same_size(x: Tensor, size: tuple[Any, Any]) -> bool:
    if torch.jit.is_tracing():
        return False  # sizes are graph values: always resize (an identity resize is exact)
    return (int(x.shape[-2]), int(x.shape[-1])) == (int(size[0]), int(size[1]))


def _sizes_tensor(sizes: Sequence[tuple[Any, Any]], device: torch.device) -> Tensor:
    if torch.jit.is_tracing():
        return torch.stack([torch.stack([_traced(h, torch.empty(0)), _traced(w, torch.empty(0))]) for h, w in sizes])
    out = torch.tensor([[int(h), int(w)] for h, w in sizes], dtype=torch.int64)
    if device.type == "cuda":  # pinned, so the copy does not wait for the queued kernels
        return out.pin_memory().to(device, non_blocking=True)
    return out.to(device)
