"""Checkpoints: written atomically, read with ``weights_only=True``.

A detkit checkpoint is a dict::

    {"format": "detkit", "format_version": 1,
     "model": state_dict, "config": {...resolved config...}, "classes": [...],
     "optimizer": ..., "scheduler": ..., "scaler": ..., "epoch": int, "step": int,
     "metrics": {...}, "versions": {"detkit": ..., "torch": ..., ...}}

Only ``model``, ``config`` and ``classes`` are required to predict.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

import detkit
from detkit.errors import CheckpointError, DetkitError

# Files are written and read in core (detkit.io), shared with plugins and data.
from detkit.io import atomic_torch_save, atomic_write_text, load_file, load_model_state, state_mismatches
from detkit.registry import ComponentValidationError, build_detector, format_loc, without_pretrained

__all__ = [
    "atomic_torch_save", "atomic_write_text", "build_detector", "load_checkpoint", "load_detector",
    "load_file", "load_model_state", "save_checkpoint", "state_mismatches", "versions", "without_pretrained",
]

FORMAT = "detkit"
# 2: the one-forward detector (backbone/rpn/roi_head, stages owning their losses).
# Version-1 files are upgraded on load by their detector's upgrade_checkpoint.
FORMAT_VERSION = 2


def versions() -> dict[str, str]:
    return {
        "detkit": detkit.__version__,
        # TorchVersion is a str subclass that weights_only loading refuses.
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


def save_checkpoint(path: str | Path, **fields: Any) -> Path:
    """Write a detkit checkpoint with ``fields`` (model, config, classes, ...)."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **fields}
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a detkit checkpoint and check it has what predicting needs."""
    ckpt = load_file(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a detkit checkpoint (for faster-rcnn-pytorch weights use `detkit import-weights`)"
        )
    missing = [k for k in ("model", "config", "classes") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by a newer detkit (format {ckpt['format_version']}); upgrade detkit"
        )
    if ckpt.get("format_version", 0) < FORMAT_VERSION:
        ckpt = _upgrade(path, ckpt)
    return ckpt


def _upgrade(path: str | Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """An earlier-format checkpoint in today's layout, by its detector's ``upgrade_checkpoint``."""
    from detkit.registry import registry

    model_type = (ckpt["config"].get("model") or {}).get("type")
    try:
        factory = registry("detector").get(str(model_type)).factory
    except DetkitError as exc:
        raise CheckpointError(f"{path}: written by an earlier detkit and cannot be upgraded: {exc}") from None
    config, state = factory.upgrade_checkpoint(ckpt["config"], ckpt["model"])
    return {**ckpt, "config": config, "model": state, "format_version": FORMAT_VERSION}


def load_detector(path: str | Path, map_location: str | torch.device = "cpu",
                  model_section: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
    """``(model, checkpoint)`` from a detkit checkpoint, the model in eval mode.

    ``model_section`` maps the stored ``config`` to the model section to build (default:
    the stored one): other test-time settings (input size, thresholds, proposal counts)
    around the checkpoint's weights, which must still fit it key for key.
    """
    ckpt = load_checkpoint(path, map_location)
    try:
        section = model_section(ckpt["config"]) if model_section is not None else ckpt["config"]["model"]
        model = build_detector(section, len(ckpt["classes"]))
    except ComponentValidationError as exc:
        # The user did not write this config: say where it came from.
        raise CheckpointError(
            f"{path}: the config stored in this checkpoint no longer validates with the installed "
            "plugins: " + "; ".join(f"model.{format_loc(loc) or 'type'}: {msg}" for loc, msg in exc.errors)
        ) from None
    load_model_state(model, ckpt["model"], str(path))
    model.eval()
    return model, ckpt
