"""torchvision's published weights, found in or fetched into torch's cache.

``$TORCH_HOME/hub/checkpoints/<file>`` (``torch.hub.get_dir()``) is where
torchvision's own ``weights=`` API keeps its files, so a file fetched by
either is reused by the other.  Fetching goes through torchvision's weights
API (``torchvision.models.get_weight``) with its progress bar; without network
the error is one line naming the file to place and where.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from detkit.errors import CheckpointError


def cache_dir() -> Path:
    """The directory torchvision caches weight files in."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_enum(name: str):
    """torchvision's weights entry ``name`` (e.g. ``ResNet50_Weights.IMAGENET1K_V1``)."""
    import torchvision

    try:
        return torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"torchvision has no weights named {name!r} ({exc})") from None


def weights_by_file(filename: str):
    """The torchvision weights entry whose URL ends in ``filename``, or ``None``."""
    import torchvision

    for model in torchvision.models.list_models():
        try:
            enum = torchvision.models.get_model_weights(model)
        except (ValueError, KeyError):
            continue
        for entry in enum:
            if os.path.basename(entry.url) == filename:
                return entry
    return None


def fetch(entry, what: str) -> Path:
    """The local file of the torchvision weights ``entry``: cached, or downloaded now.

    ``what`` names the weights in messages.  Offline (or on any download
    failure) raises one line naming the file and the directory to put it in.
    """
    filename = os.path.basename(entry.url)
    path = cache_dir() / filename
    if path.is_file():
        return path
    try:
        # What entry.get_state_dict() does (torchvision's weights API): load_state_dict_from_url
        # into the hub cache, with a progress bar; called through torch.hub so it can be stubbed.
        torch.hub.load_state_dict_from_url(entry.url, progress=True, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, hash mismatch, socket timeouts ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"cannot download {what} from {entry.url} ({reason}); without network, place {filename} "
            f"in {path.parent} (or give its path)"
        ) from None
    if not path.is_file():
        raise CheckpointError(f"torchvision reported {what} downloaded, but {path} is not there")
    return path
