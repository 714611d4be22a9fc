"""Choosing the device a command runs on."""

from __future__ import annotations

import torch

from detkit.errors import ConfigError


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """``auto`` is CUDA when available, else CPU; an unusable name is a ConfigError naming ``field``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{field}: {name!r} is not a device (use auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field}: {name!r} requested but CUDA is not available on this machine")
    return device
