"""Import weights trained by another implementation into a detkit checkpoint.

Supported source: the faster-rcnn-pytorch layout (``extractor.*``, ``rpn.*``,
``head.*``; see ``configs/import/``).  The detector is built from an import
config that reproduces that implementation's inference pipeline, the weights
are mapped onto it, and the result is saved as an ordinary detkit checkpoint
that ``detkit predict`` and ``detkit eval`` read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from detkit.errors import CheckpointError, ConfigError, DataError

BACKBONES = ("vgg16", "resnet50")


def default_import_config(backbone: str) -> Path:
    """``configs/import/faster_rcnn_pytorch_<backbone>.yaml`` of this source tree."""
    if backbone not in BACKBONES:
        raise ConfigError(f"--backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
    name = f"faster_rcnn_pytorch_{backbone}.yaml"
    candidates = [
        Path(__file__).resolve().parents[2] / "configs" / "import" / name,  # source checkout
        Path.cwd() / "configs" / "import" / name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(
        f"import config {name} not found (looked in {', '.join(str(c.parent) for c in candidates)}); "
        "pass it with --config"
    )


def read_classes(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: classes file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read classes file ({exc})") from None
    classes = [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]
    if not classes:
        raise DataError(f"{path}: classes file lists no class names (expected one per line)")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate class names: {', '.join(dupes)}")
    return classes


def extract_state_dict(obj: Any, src: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: bare, or under ``model`` / ``state_dict``."""
    if isinstance(obj, Mapping) and obj.get("format") == "detkit":
        raise CheckpointError(f"{src}: already a detkit checkpoint; nothing to import")
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{src}: no state dict found (expected a mapping of parameter names to tensors)")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{src}: not a state dict; non-tensor entries: {', '.join(map(str, not_tensors[:5]))}")
    # A DataParallel-saved model prefixes every key with "module.".
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def import_weights(
    src: str | Path,
    dst: str | Path,
    config_path: str | Path,
    classes_file: str | Path,
    overrides: Iterable[str] = (),
    source: str = "faster-rcnn-pytorch",
) -> Path:
    """Convert the checkpoint ``src`` into the detkit checkpoint ``dst``; returns ``dst``."""
    from detkit.config import load_config
    from detkit.engine.checkpoint import build_detector, load_file, save_checkpoint, without_pretrained

    classes = read_classes(classes_file)
    cfg = load_config(config_path, overrides)
    state = extract_state_dict(load_file(src), src)
    config = cfg.to_dict()
    config["model"] = without_pretrained(config["model"])  # weights come from src
    model = build_detector(config["model"], len(classes))
    if not hasattr(model, "import_state_dict"):
        raise ConfigError(f"{config_path}: model {config['model']['type']!r} cannot import {source} weights")
    try:
        model.import_state_dict(state, source=source)
    except CheckpointError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    return save_checkpoint(
        dst,
        model=model.state_dict(),
        config=config,
        classes=classes,
        imported_from={"path": str(src), "source": source},
    )
