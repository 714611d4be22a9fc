"""Checkpoints: written atomically, read with ``weights_only=True``.

A detkit checkpoint is a dict::

    {"format": "detkit", "format_version": 1,
     "model": state_dict, "config": {...resolved config...}, "classes": [...],
     "optimizer": ..., "scheduler": ..., "scaler": ..., "epoch": int, "step": int,
     "metrics": {...}, "versions": {"detkit": ..., "torch": ..., ...}}

Only ``model``, ``config`` and ``classes`` are required to predict.
"""

from __future__ import annotations

import os
import pickle
import platform
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import torchvision

import detkit
from detkit.errors import CheckpointError

FORMAT = "detkit"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    return {
        "detkit": detkit.__version__,
        # TorchVersion is a str subclass that weights_only loading refuses.
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename over it.

    A crash or a full disk leaves the previous file intact, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file (results, configs) via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | Path, **fields: Any) -> Path:
    """Write a detkit checkpoint with ``fields`` (model, config, classes, ...)."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **fields}
    return atomic_save(payload, path)


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load any ``torch.save`` file safely; a missing or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", l).strip() for l in str(exc).splitlines()]
        # torch's weights_only message names the offending object on a later line.
        detail = next((l for l in lines if "Unsupported global" in l), next((l for l in lines if l), ""))
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail or type(exc).__name__})") from None


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
    return ckpt


def state_mismatches(
    own: dict[str, Any], theirs: dict[str, Any], name: Any = lambda key: key, shown: int = 8
) -> list[str]:
    """Missing keys, unexpected keys and wrong shapes between two state dicts.

    ``name`` turns a key into the spelling the user knows (their checkpoint's).
    Empty when ``theirs`` fits ``own``.
    """
    missing = sorted(name(k) for k in own.keys() - theirs.keys())
    unexpected = sorted(name(k) for k in theirs.keys() - own.keys())
    wrong = sorted(
        f"{name(k)} {tuple(getattr(theirs[k], 'shape', ()))} (model expects {tuple(own[k].shape)})"
        for k in own.keys() & theirs.keys()
        if tuple(getattr(theirs[k], "shape", ())) != tuple(own[k].shape)
    )
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
            problems.append(f"{label}: {', '.join(keys[:shown])}{more}")
    return problems


def load_model_state(model: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists the mismatches."""
    problems = state_mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(problems))
    model.load_state_dict(state)


def without_pretrained(section: Any) -> Any:
    """A copy of a component mapping with every ``pretrained`` parameter cleared.

    Weights about to be loaded from a checkpoint make ImageNet initialisation
    pointless, and the file it named may not exist on this machine.
    """
    if isinstance(section, dict):
        return {k: (None if k == "pretrained" else without_pretrained(v)) for k, v in section.items()}
    if isinstance(section, list):
        return [without_pretrained(v) for v in section]
    return section


def build_detector(model: dict[str, Any], num_classes: int) -> torch.nn.Module:
    """Build the detector of a resolved ``model`` section without ImageNet weights.

    For weights that come from elsewhere (a checkpoint, an import) or are not
    needed (anchor statistics).
    """
    from detkit.registry import registry

    return registry("detector").build(without_pretrained(model), num_classes=num_classes)


def load_detector(path: str | Path, map_location: str | torch.device = "cpu"):
    """``(model, checkpoint)`` from a detkit checkpoint, the model in eval mode."""
    ckpt = load_checkpoint(path, map_location)
    model = build_detector(ckpt["config"]["model"], len(ckpt["classes"]))
    load_model_state(model, ckpt["model"], str(path))
    model.eval()
    return model, ckpt
