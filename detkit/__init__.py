"""detkit: a plugin-based two-stage object-detection toolkit on PyTorch.

The public API (imported on first use, so ``import detkit`` stays light)::

    import detkit
    model = detkit.load("runs/quickstart/best.pt")        # a detkit.Predictor
    dets = model.predict("street.jpg")                     # list of detkit.Detections
    run_dir = detkit.train("configs/quickstart.yaml", overrides=["train.epochs=1"])
    result = detkit.evaluate(run_dir / "best.pt")

Plugin authors use :mod:`detkit.registry` (``detkit.registry.registry("backbone")``)
and the contracts in :mod:`detkit.interfaces`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("detkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from detkit import errors, registry
    from detkit.api import Detections, ImageLike, Predictor, evaluate, load, predict_files, train

_API = ("Detections", "ImageLike", "Predictor", "evaluate", "load", "predict_files", "train")
_MODULES = ("errors", "registry", "interfaces", "config", "plugins")

__all__ = [*_API, "errors", "registry", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `detkit --help` and plugins importing `detkit` must not pay for torch models.
    if name in _API:
        return getattr(importlib.import_module("detkit.api"), name)
    if name in _MODULES:
        return importlib.import_module(f"detkit.{name}")
    raise AttributeError(f"module 'detkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, *_MODULES})
