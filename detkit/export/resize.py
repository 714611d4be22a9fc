"""Traceable image resizing that reproduces ``predict``'s resizing bit for bit.

``predict`` resizes 8-bit images with PIL (``backend: pil``) or with torch's
native uint8 antialiased kernel (``backend: torch``, through torchvision).
Neither traces into a graph: PIL is not torch, and the ONNX exporter has no
antialiased resize.  Both kernels are the same separable algorithm (Pillow's
``Resample.c``, which torch's uint8 kernel follows): per output pixel a
window of filter weights around the mapped centre, normalised, turned into
fixed-point integers, one horizontal then one vertical pass, each rounded and
clamped to 8 bits.  They differ only in the fixed-point precision: Pillow
always uses 22 bits, torch the most bits that keep the largest weight of a
pass within int16.

Here each pass is a dense ``[out, in]`` weight matrix built from the sizes
with tensor operations (so height and width stay dynamic in a traced graph)
and applied with one float64 matrix product; every product and partial sum
is an integer below 2**53, so the result is exact and equals the reference
kernels' output.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Backend = Literal["pil", "torch"]
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


def resample_weights(in_size: Tensor, out_size: Tensor, kind: Filter, backend: Backend) -> tuple[Tensor, Tensor]:
    """``([out, in] integer weights as float64, precision bits)`` of one resampling pass.

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
    w = torch.where(total != 0.0, w / torch.where(total != 0.0, total, torch.ones_like(total)), w)
    if backend == "pil":
        bits = torch.full((), _PIL_PRECISION, dtype=torch.float64, device=in_size.device)
    else:
        # torch: the most bits (< 22) for which the largest weight, rounded, fits in int16.
        candidates = torch.arange(_PIL_PRECISION, dtype=torch.float64, device=in_size.device)
        fits = torch.floor(0.5 + w.max() * torch.pow(2.0, candidates + 1.0)) < 32768.0
        bits = fits.to(torch.float64).sum()
    return _round_half_away(w * torch.pow(2.0, bits)), bits


def _fixed_point_pass(x: Tensor, weights: Tensor, bits: Tensor) -> Tensor:
    """``x [..., in]`` float64 integers -> ``[..., out]``: weighted sums, rounded down and clamped to 8 bits."""
    one = torch.pow(2.0, bits)
    acc = torch.matmul(x, weights.transpose(0, 1)) + one / 2.0
    return torch.floor(acc / one).clamp(0.0, 255.0)


def resize_uint8(
    image: Tensor, height: Tensor, width: Tensor, kind: Filter = "bicubic", backend: Backend = "torch"
) -> Tensor:
    """Resize a uint8 ``[C, H, W]`` image to ``(height, width)`` (0-d int64 tensors); float32 0..255 out.

    torch's kernel always runs the horizontal pass first.  Pillow runs the
    vertical pass first when the height shrinks by more than twice as many
    pixels as the width (read from Pillow 13's ``ImagingResample``, checked
    against it in the tests); the order changes the intermediate rounding, so
    for ``pil`` both orders are computed and the right one is selected (a
    traced graph cannot branch on sizes).  A pass whose size does not change
    is skipped by both libraries and is the identity here.
    """
    in_h, in_w = _size(image, -2), _size(image, -1)
    x = image.to(torch.float64)
    wx, bx = resample_weights(in_w, width, kind, backend)
    wy, by = resample_weights(in_h, height, kind, backend)

    def horizontal(t: Tensor) -> Tensor:
        return _fixed_point_pass(t, wx, bx)

    def vertical(t: Tensor) -> Tensor:
        return _fixed_point_pass(t.transpose(-1, -2), wy, by).transpose(-1, -2)

    out = vertical(horizontal(x))
    if backend == "pil":
        shrink_h, shrink_w = in_h - height, in_w - width
        vertical_first = (shrink_h > 0) & (shrink_h > 2 * shrink_w)
        out = torch.where(vertical_first, horizontal(vertical(x)), out)
    return out.to(torch.float32)


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
