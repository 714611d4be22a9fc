"""Reading image files into tensors: every file detkit reads goes through here.

An image is read as it looks in a viewer: EXIF orientation applied and
converted to 8-bit RGB, the same pixels as PIL's
``ImageOps.exif_transpose(im).convert("RGB")``, with one exception PIL gets
wrong: 16-bit grey (modes ``I;16*``, and ``I`` from a PNG) would be clipped
at 255 (an all-white image); it is scaled by its high byte, ``v >> 8`` (what
torchvision's ``to_dtype(..., scale=True)`` does, and what PIL's own reader
does for 16-bit RGB and RGBA PNGs).  Other 32-bit integer and float images
(``I``, ``F``: TIFFs) have no agreed 8-bit scale and are refused in one line.
Palette, LA, RGBA (alpha dropped, not composited), CMYK and YCbCr files are
converted by PIL's ``convert("RGB")``.

JPEG files (and MPO, whose first picture is one) are decoded by ``torchvision.io.decode_jpeg`` (libjpeg-turbo
straight into a ``[3, H, W]`` uint8 tensor, no PIL image and no numpy copy in
between) and turned by their EXIF orientation in torch; other formats, and
JPEGs that decoder refuses (CMYK, damaged files), go through PIL.  Both give
the same pixels for ordinary baseline and progressive JPEGs (both use
libjpeg-turbo with its default IDCT and chroma upsampling).

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
_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


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


def orientation(im: Image.Image, header_only: bool = False) -> int:
    """The EXIF orientation (2..8) PIL's ``exif_transpose`` would apply, else 1.

    ``header_only`` reads only what opening the file read (a PNG's ``eXIf``
    chunk after its pixel data is then missed, but nothing is decoded).  A
    damaged EXIF block counts as no orientation: it must not make a readable
    image unreadable.
    """
    try:
        exif = Image.Image.getexif(im) if header_only else im.getexif()
        value = exif.get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF, in any of the ways PIL reports it
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def apply_orientation(image: Tensor, value: int) -> Tensor:
    """``image [C, H, W]`` transposed as EXIF orientation ``value`` says (PIL's ``exif_transpose``)."""
    if value == 2:
        return image.flip(-1)
    if value == 3:
        return image.flip((-2, -1))
    if value == 4:
        return image.flip(-2)
    if value == 5:
        return image.transpose(-2, -1)
    if value == 6:
        return image.rot90(-1, (-2, -1))
    if value == 7:
        return image.transpose(-2, -1).flip((-2, -1))
    if value == 8:
        return image.rot90(1, (-2, -1))
    return image


def pil_to_uint8(im: Image.Image, name: str = "image") -> Tensor:
    """A PIL image as uint8 ``[3, H, W]`` RGB, as it looks (see the module docstring).

    ``name`` (the file, or where an API input came from) starts error messages.
    """
    if im.mode in _SIXTEEN_BIT_GREY or (im.mode == "I" and im.format == "PNG"):
        grey = (np.asarray(im) >> 8).astype(np.uint8)  # PNG "I" holds 0..65535 (older Pillow)
        arr = np.repeat(grey[:, :, None], 3, axis=2)
    elif im.mode in ("I", "F"):
        kind = "32-bit integer" if im.mode == "I" else "32-bit float"
        raise DataError(f"{name}: {kind} image (PIL mode {im.mode}) has no agreed 8-bit scale; "
                        "save it as 8- or 16-bit (e.g. PNG)")
    else:
        arr = np.asarray(im.convert("RGB"))
    return apply_orientation(torch.from_numpy(arr.copy()).permute(2, 0, 1), orientation(im))


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
    """An image file as uint8 ``[3, H, W]`` RGB, as it looks (see the module docstring)."""
    path = Path(path)
    try:
        with _open(path) as im:
            _check_size(path, *im.size)
            # MPO (phone cameras' multi-picture JPEGs): the file opens with its first picture, a JPEG.
            if im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L"):
                image = _decode_jpeg(path.read_bytes())
                if image is not None:  # a JPEG's EXIF is in its header: nothing more is read
                    return apply_orientation(image, orientation(im))
            return pil_to_uint8(im, str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


def load_image(path: str | Path) -> Tensor:
    """An RGB image file as float32 ``[3, H, W]`` in 0..1; unreadable files raise DataError."""
    return read_image_uint8(path).float().div_(255)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file as :func:`read_image_uint8` gives it (EXIF
    orientation applied), from its header only."""
    path = Path(path)
    try:
        with _open(path) as im:
            w, h = im.size
            turned = orientation(im, header_only=True) >= 5  # 5..8 swap the sides
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    return (w, h) if turned else (h, w)
