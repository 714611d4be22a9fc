"""Reading image files into tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from detkit.errors import DataError


def read_image_uint8(path: str | Path) -> Tensor:
    """An image file as uint8 ``[3, H, W]`` RGB (grey and RGBA converted as PIL does)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_image(path: str | Path) -> Tensor:
    """An RGB image file as float32 ``[3, H, W]`` in 0..1; unreadable files raise DataError."""
    return read_image_uint8(path).float().div_(255)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header only."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    return h, w
