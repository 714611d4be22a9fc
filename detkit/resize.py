"""The one resize policy of detkit, and resizing that traces into an exported graph.

:func:`resize_shape` is the size rule (short side to ``min_size``, long side
capped at ``max_size``); :func:`resized_size` is the same rule in tensor
arithmetic, so an exported graph sizes every image as eager code does.

Pixels: :func:`resize_float` resizes float images with torch's kernels
(bilinear or bicubic, optionally antialiased).  ONNX has no antialiased
resize, so when tracing, the antialiased case runs as two matrix products
with the same filter weights (Pillow's separable algorithm, which torch's
antialiased kernels follow).  :func:`resize_uint8` reproduces Pillow's
8-bit resize exactly (``preprocess.backend: pil``, for pipelines that resize
8-bit images with PIL): per output pixel a window of filter weights around
the mapped centre, normalised, turned into 22-bit fixed-point integers, one
horizontal and one vertical pass, each rounded and clamped to 8 bits; every
product and partial sum is an integer below 2**53, so float64 matrix
products are exact.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

Filter = Literal["bicubic", "bilinear"]

_PIL_PRECISION = 22  # Pillow's PRECISION_BITS (32 - 8 - 2)
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _filter(x: Tensor, kind: Filter) -> Tensor:
    """Pillow's (and torch's antialias) filters: triangle, or Keys cubic with a = -0.5."""
    x = x.abs()
    if kind == "bilinear":
        return (1.0 - x).clamp(min=0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _round_half_away(x: Tensor) -> Tensor:
    """C's ``(int)(x + 0.5)`` for ``x >= 0`` and ``(int)(x - 0.5)`` below: half away from zero."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def resize_shape(
    height: int, width: int, min_size: int, max_size: int | None, rounding: str = "round"
) -> tuple[int, int]:
    """Output ``(height, width)``: short side ``min_size``, long side at most ``max_size``.

    ``scale = min(min_size / short, max_size / long)``, each side times
    ``scale``, then rounded (``round``, the default), floored in floating
    point (``floor``: torchvision's ``GeneralizedRCNNTransform``) or truncated
    from exact integer ratios (``truncate``: faster-rcnn-pytorch).
    ``max_size=None``: no cap on the long side.
    """
    short, long = min(height, width), max(height, width)
    scale = min_size / short
    if max_size is not None and long * scale > max_size:
        scale = max_size / long
    if rounding == "floor":
        return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
    if rounding == "truncate":
        # The limiting side gets its target exactly, the other side is truncated
        # from exact integer arithmetic; "floor" may give min_size - 1 where the
        # floating-point scale rounds down.
        capped = max_size is not None and long * min_size > max_size * short
        num, den = (max_size, long) if capped else (min_size, short)
        return max(1, height * num // den), max(1, width * num // den)
    if rounding != "round":
        raise ValueError(f"rounding must be 'round', 'floor' or 'truncate', got {rounding!r}")
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resized_size(
    height: Tensor, width: Tensor, min_size: int, max_size: int | None, rounding: str = "round"
) -> tuple[Tensor, Tensor]:
    """:func:`resize_shape` on 0-d int64 sizes, in tensor arithmetic (traced sizes stay dynamic).

    The same IEEE operations in float64 (``round``, ``floor``: Python floats
    are doubles; ``torch.round`` rounds half to even as ``round`` does) or
    integer floor division (``truncate``).
    """
    short, long = torch.minimum(height, width), torch.maximum(height, width)
    if rounding == "truncate":
        num, den = torch.full_like(short, min_size), short
        if max_size is not None:
            capped = long * min_size > max_size * short
            num = torch.where(capped, torch.full_like(long, max_size), num)
            den = torch.where(capped, long, den)
        new_h, new_w = height * num // den, width * num // den
    else:
        if rounding not in ("floor", "round"):
            raise ValueError(f"rounding must be 'round', 'floor' or 'truncate', got {rounding!r}")
        # [1] float64 vectors, not 0-d: ONNX export computes 0-d arithmetic in float32 (as_f64).
        h, w = as_f64(height), as_f64(width)
        # full_like(...) / x, not number / x: torch computes the latter as reciprocal(x) * number.
        shortf, longf = as_f64(short), as_f64(long)
        scale = torch.full_like(shortf, min_size) / shortf
        if max_size is not None:
            scale = torch.where(longf * scale > max_size, torch.full_like(longf, max_size) / longf, scale)
        step = torch.floor if rounding == "floor" else torch.round
        new_h, new_w = step(h * scale).to(torch.int64).reshape(()), step(w * scale).to(torch.int64).reshape(())
    return new_h.clamp(min=1), new_w.clamp(min=1)


def filter_weights(in_size: Tensor, out_size: Tensor, kind: Filter) -> Tensor:
    """``[out, in]`` float64 weights of one antialiased resampling pass, each row summing to 1.

    ``in_size``/``out_size`` are 0-d int64 tensors (traced sizes in a graph).
    """
    in_f, out_f = as_f64(in_size), as_f64(out_size)
    scale = in_f / out_f
    filterscale = scale.clamp(min=1.0)
    support = _SUPPORT[kind] * filterscale
    centre = (torch.arange(out_size, dtype=torch.float64, device=in_size.device) + 0.5) * scale  # [out]
    # The window [xmin, xmax) of each output pixel, as Pillow rounds it.
    xmin = torch.floor(centre - support + 0.5).clamp(min=0.0)
    xmax = torch.minimum(torch.floor(centre + support + 0.5), in_f)
    src = torch.arange(in_size, dtype=torch.float64, device=in_size.device)  # [in]
    inside = (src[None, :] >= xmin[:, None]) & (src[None, :] < xmax[:, None])
    w = _filter((src[None, :] - centre[:, None] + 0.5) * (1.0 / filterscale), kind)  # as the C code
    w = torch.where(inside, w, torch.zeros_like(w))
    total = w.sum(dim=1, keepdim=True)
    return torch.where(total != 0.0, w / torch.where(total != 0.0, total, torch.ones_like(total)), w)


def pil_weights(in_size: Tensor, out_size: Tensor, kind: Filter) -> Tensor:
    """``[out, in]`` Pillow's 22-bit integer weights (as float64) of one 8-bit resampling pass."""
    return _round_half_away(filter_weights(in_size, out_size, kind) * float(2**_PIL_PRECISION))


def resize_float(image: Tensor, height: Tensor | int, width: Tensor | int, kind: Filter = "bilinear",
                 antialias: bool = False) -> Tensor:
    """Resize a float ``[C, H, W]`` image to ``(height, width)`` (ints, or 0-d int64 tensors when tracing).

    torch's bilinear/bicubic kernels (``align_corners=False``).  Traced with
    ``antialias``, the same filter runs as two matrix products (ONNX has no
    antialiased resize); the results agree to float rounding.
    """
    if antialias and torch.jit.is_tracing():
        in_h, in_w = _size(image, -2), _size(image, -1)
        wy = filter_weights(in_h, _as_size(height, image), kind)
        wx = filter_weights(in_w, _as_size(width, image), kind)
        x = torch.matmul(image.to(torch.float64), wx.transpose(0, 1))
        return torch.matmul(wy, x).to(image.dtype)
    return F.interpolate(image[None], size=(height, width), mode=kind, align_corners=False, antialias=antialias)[0]


def _as_size(size: Tensor | int, like: Tensor) -> Tensor:
    return size if isinstance(size, Tensor) else torch.tensor(size, dtype=torch.int64, device=like.device)


def _fixed_point_pass(x: Tensor, weights: Tensor) -> Tensor:
    """``x [..., in]`` float64 integers -> ``[..., out]``: weighted sums, rounded down and clamped to 8 bits."""
    one = float(2**_PIL_PRECISION)
    acc = torch.matmul(x, weights.transpose(0, 1)) + one / 2.0
    return torch.floor(acc / one).clamp(0.0, 255.0)


def resize_uint8(image: Tensor, height: Tensor, width: Tensor, kind: Filter = "bicubic") -> Tensor:
    """Resize a uint8 ``[C, H, W]`` image as Pillow does to ``(height, width)`` (0-d int64 tensors); float32 0..255 out.

    Pillow runs the vertical pass first when the height shrinks by more than
    twice as many pixels as the width (read from Pillow 13's
    ``ImagingResample``, checked against it in the tests); the order changes
    the intermediate rounding, so both orders are computed and the right one
    is selected (a traced graph cannot branch on sizes).  A pass whose size
    does not change is skipped by Pillow and is the identity here.
    """
    in_h, in_w = _size(image, -2), _size(image, -1)
    x = image.to(torch.float64)
    wx, wy = pil_weights(in_w, width, kind), pil_weights(in_h, height, kind)

    def horizontal(t: Tensor) -> Tensor:
        return _fixed_point_pass(t, wx)

    def vertical(t: Tensor) -> Tensor:
        return _fixed_point_pass(t.transpose(-1, -2), wy).transpose(-1, -2)

    shrink_h, shrink_w = in_h - height, in_w - width
    vertical_first = (shrink_h > 0) & (shrink_h > 2 * shrink_w)
    return torch.where(vertical_first, horizontal(vertical(x)), vertical(horizontal(x))).to(torch.float32)


def as_f64(size: Tensor) -> Tensor:
    """A 0-d size as a one-element float64 vector.

    The ONNX exporter treats 0-d tensors as Python scalars and computes
    arithmetic between two of them in float32 (``96 / 64`` as Cast-Div-Cast):
    an error in the 8th digit that moved a filter weight across a rounding
    boundary (90 -> 77 px) and a pixel by one level.  A ``[1]`` tensor keeps
    its dtype.
    """
    return size.to(torch.float64).reshape(1)


def _size(image: Tensor, dim: int) -> Tensor:
    """A dimension as a 0-d int64 tensor: traced when tracing, so the graph keeps it dynamic."""
    size = image.shape[dim]
    return size if isinstance(size, Tensor) else torch.tensor(size, dtype=torch.int64, device=image.device)
