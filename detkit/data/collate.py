"""Batching: pad images to one size and keep each image's true size."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass
class Batch:
    """N transformed samples.

    images: float32 ``[N, 3, H, W]`` in 0..1, zero-padded at the bottom/right
    (uint8 0..255 while in transit from a loader built with ``uint8=True``:
    a quarter of the bytes through worker queues, pinned memory and the
    host-to-device copy; :meth:`to` turns them into float32 on the target
    device);
    image_sizes: int64 ``[N, 2]`` true (h, w) of each image inside the padding;
    boxes / labels / difficult: per image ``[G, 4]`` float32 / ``[G]`` int64 / ``[G]`` bool;
    scales: float32 ``[N]`` resize factor of each image; orig_sizes: int64
    ``[N, 2]`` (h, w) before resizing; image_ids: N strings.
    """

    images: Tensor
    image_sizes: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    difficult: list[Tensor]
    scales: Tensor
    orig_sizes: Tensor
    image_ids: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device`` (image ids stay as they are); images as float32 0..1."""

        def move(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, list) and x and isinstance(x[0], Tensor):
                return [t.to(device, non_blocking=non_blocking) for t in x]
            return x

        moved = replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})
        if moved.images.dtype == torch.uint8:  # converted where it lands: on the GPU, not the host
            moved.images = moved.images.float().div_(255)
        return moved

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)`` for custom batch types."""

        def pin(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.pin_memory()
            if isinstance(x, list) and x and isinstance(x[0], Tensor):
                return [t.pin_memory() for t in x]
            return x

        return replace(self, **{f.name: pin(getattr(self, f.name)) for f in fields(self)})

    @property
    def targets(self) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes", "labels", "difficult"}``, the evaluators' input."""
        return [
            {"boxes": b, "labels": l, "difficult": d} for b, l, d in zip(self.boxes, self.labels, self.difficult)
        ]

    def to_original(self, boxes: Tensor, index: int) -> Tensor:
        """Map ``[K, 4]`` boxes of image ``index`` from network-input to original pixels."""
        h, w = self.image_sizes[index].tolist()
        oh, ow = self.orig_sizes[index].tolist()
        return boxes * boxes.new_tensor([ow / w, oh / h, ow / w, oh / h])


def to_uint8(image: Tensor) -> Tensor:
    """A float 0..1 image as uint8 0..255 (rounded); uint8 images pass through."""
    if image.dtype == torch.uint8:
        return image
    return image.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def pad_images(images: Sequence[Tensor], size_divisor: int = 0, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Stack ``[3, h_i, w_i]`` images into a zero-padded ``[N, 3, H, W]`` and their sizes ``[N, 2]``.

    With ``size_divisor > 1``, ``H`` and ``W`` are rounded up to a multiple of it.
    ``dtype=torch.uint8`` stores float 0..1 images as 0..255 (rounded).
    """
    sizes = torch.tensor([[im.shape[-2], im.shape[-1]] for im in images], dtype=torch.int64)
    h, w = (int(v) for v in sizes.amax(0)) if len(images) else (0, 0)
    if size_divisor > 1:
        h = -(-h // size_divisor) * size_divisor
        w = -(-w // size_divisor) * size_divisor
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w), dtype=dtype)
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]].copy_(to_uint8(im) if dtype == torch.uint8 else im)
    return out, sizes


class Collate:
    """``collate([(image, target), ...]) -> Batch`` (a class, so that workers can pickle it).

    ``uint8=True`` ships the images as uint8 (see :class:`Batch`).
    """

    def __init__(self, size_divisor: int = 0, uint8: bool = False):
        self.size_divisor = size_divisor
        self.uint8 = uint8

    def __call__(self, samples: Sequence[tuple[Tensor, dict[str, Any]]]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        images, targets = zip(*samples)
        padded, sizes = pad_images(images, self.size_divisor, torch.uint8 if self.uint8 else None)
        orig = [t.get("orig_size") for t in targets]
        return Batch(
            images=padded,
            image_sizes=sizes,
            boxes=[t["boxes"].float() for t in targets],
            labels=[t["labels"].long() for t in targets],
            difficult=[
                t["difficult"].bool() if "difficult" in t else torch.zeros(len(t["labels"]), dtype=torch.bool)
                for t in targets
            ],
            scales=torch.tensor([float(t.get("scale", 1.0)) for t in targets], dtype=torch.float32),
            orig_sizes=torch.stack(
                [o if o is not None else s for o, s in zip(orig, sizes)]
            ).to(torch.int64),
            image_ids=[str(t.get("image_id", "")) for t in targets],
        )


def collate(samples: Sequence[tuple[Tensor, dict[str, Any]]]) -> Batch:
    """Collate without rounding the padded size."""
    return Collate()(samples)
