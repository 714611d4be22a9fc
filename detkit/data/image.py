"""Reading image files into tensors.

JPEG files are decoded by ``torchvision.io.decode_jpeg`` (libjpeg-turbo
straight into a ``[3, H, W]`` uint8 tensor: no PIL image and no numpy copy in
between); other formats, and JPEGs that decoder refuses (CMYK, damaged
files), go through PIL.  Both give the same pixels for ordinary baseline and
progressive JPEGs (both use libjpeg-turbo with its default IDCT and chroma
upsampling; EXIF orientation is ignored by both, as before).

Very large images are refused before decoding, with one line naming the file
and its size: the limit is ``DETKIT_MAX_IMAGE_PIXELS`` (pixels; ``0`` = no
limit), by default PIL's decompression-bomb threshold (2 x
``PIL.Image.MAX_IMAGE_PIXELS``, about 179 M pixels).  It is read at each call,
so data-loader workers see the value the main process was started with.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from detkit.errors import DataError

_PIL_DEFAULT_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
LIMIT_ENV = "DETKIT_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int | None:
    """The largest image (in pixels) detkit decodes; None when unlimited."""
    value = os.environ.get(LIMIT_ENV, "").strip()
    if not value:
        return _PIL_DEFAULT_LIMIT
    try:
        limit = int(float(value))
    except ValueError:
        raise DataError(f"{LIMIT_ENV}={value!r}: expected a number of pixels (0 = no limit)") from None
    return None if limit <= 0 else limit


def _open(path: Path) -> Image.Image:
    """``Image.open`` without PIL's own bomb check (ours names the file and the setting)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_size(path: Path, width: int, height: int) -> None:
    limit = max_image_pixels()
    if limit is not None and width * height > limit:
        raise DataError(
            f"{path}: image is {width}x{height} ({width * height / 1e6:.1f} M pixels), over the limit of "
            f"{limit / 1e6:.1f} M pixels that guards against decompression bombs; to read it, raise the "
            f"limit with the environment variable {LIMIT_ENV}={width * height} (0 = no limit)"
        )


def _decode_jpeg(data: bytes) -> Tensor | None:
    """``[3, H, W]`` uint8 from JPEG bytes via torchvision, or None where it cannot (PIL then)."""
    try:
        with warnings.catch_warnings():
            # torchvision >= 0.29 announces a move of its decoders to torchcodec; they still work.
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (ImportError, RuntimeError, ValueError):
        return None
    return image if image.dim() == 3 and image.shape[0] == 3 else None


def read_image_uint8(path: str | Path) -> Tensor:
    """An image file as uint8 ``[3, H, W]`` RGB (grey and RGBA converted as PIL does)."""
    path = Path(path)
    try:
        with _open(path) as im:
            _check_size(path, *im.size)
            if im.format == "JPEG" and im.mode in ("RGB", "L"):
                image = _decode_jpeg(path.read_bytes())
                if image is not None:
                    return image
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_image(path: str | Path) -> Tensor:
    """An RGB image file as float32 ``[3, H, W]`` in 0..1; unreadable files raise DataError."""
    return read_image_uint8(path).float().div_(255)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header only."""
    path = Path(path)
    try:
        with _open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    return h, w
