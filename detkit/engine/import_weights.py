"""Import weights trained by another implementation into a detkit checkpoint.

Sources:

* ``faster-rcnn-pytorch`` (``extractor.*``, ``rpn.*``, ``head.*``; VGG16 or
  ResNet50 C4; see ``configs/import/faster_rcnn_pytorch_*.yaml``);
* ``torchvision``: its detection models' state dicts
  (``configs/import/torchvision_<model>.yaml``); without a file, torchvision's
  published COCO weights are fetched into its cache.

The detector is built from an import config that reproduces that
implementation's inference pipeline, the weights are mapped onto it, and the
result is saved as an ordinary detkit checkpoint that ``detkit predict`` and
``detkit eval`` read.  With ``--classes`` naming a different number of classes
than the file holds, everything but the class-specific layers is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from detkit.errors import CheckpointError, ConfigError, DataError

BACKBONES = ("vgg16", "resnet50")
SOURCES = ("faster-rcnn-pytorch", "torchvision")

# torchvision detection models that map onto detkit's components, with their COCO weights.
TORCHVISION_MODELS = {
    "fasterrcnn_resnet50_fpn": "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
    "fasterrcnn_resnet50_fpn_v2": "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
    "fasterrcnn_mobilenet_v3_large_fpn": "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1",
}
# torchvision's other detection models, with the reason they do not map.
TORCHVISION_UNSUPPORTED = {
    "maskrcnn_resnet50_fpn": "a Mask R-CNN: detkit has no mask head (its box part is fasterrcnn_resnet50_fpn's layout)",
    "maskrcnn_resnet50_fpn_v2": "a Mask R-CNN: detkit has no mask head",
    "keypointrcnn_resnet50_fpn": "a Keypoint R-CNN: detkit has no keypoint head",
    "retinanet_resnet50_fpn": "a one-stage detector (no RPN, no RoI head)",
    "retinanet_resnet50_fpn_v2": "a one-stage detector (no RPN, no RoI head)",
    "fcos_resnet50_fpn": "a one-stage detector (no RPN, no RoI head)",
    "ssd300_vgg16": "a one-stage detector (no RPN, no RoI head)",
    "ssdlite320_mobilenet_v3_large": "a one-stage detector (no RPN, no RoI head)",
}


def check_torchvision_model(model: str | None) -> str:
    """``model`` if detkit can import it, else a one-line ConfigError."""
    if model in TORCHVISION_MODELS:
        return model
    if model in TORCHVISION_UNSUPPORTED:
        raise ConfigError(f"--model {model}: not supported: {TORCHVISION_UNSUPPORTED[model]}")
    raise ConfigError(f"--model {model!r}: expected one of {', '.join(TORCHVISION_MODELS)}")


def default_import_config(backbone: str | None = None, source: str = "faster-rcnn-pytorch",
                          model: str | None = None) -> Path:
    """The import config of this source tree for ``source`` (and ``backbone`` or ``model``)."""
    if source == "torchvision":
        name = f"torchvision_{check_torchvision_model(model)}.yaml"
    elif backbone not in BACKBONES:
        raise ConfigError(f"--backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
    else:
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


def torchvision_weights(model: str) -> Path:
    """The local file of torchvision's COCO weights for ``model``: cached, or fetched now."""
    from detkit import hub

    name = TORCHVISION_MODELS[check_torchvision_model(model)]
    return hub.fetch(hub.weights_enum(name), f"torchvision's {model} weights")


def torchvision_classes(model: str) -> list[str]:
    """The class names torchvision's COCO weights for ``model`` predict, label 1 first."""
    from detkit import hub

    categories = hub.weights_enum(TORCHVISION_MODELS[check_torchvision_model(model)]).meta["categories"]
    return list(categories[1:])  # [0] is __background__


def import_weights(
    src: str | Path | None,
    dst: str | Path,
    config_path: str | Path,
    classes_file: str | Path | None,
    overrides: Iterable[str] = (),
    source: str = "faster-rcnn-pytorch",
    model: str | None = None,
) -> Path:
    """Convert the checkpoint ``src`` into the detkit checkpoint ``dst``; returns ``dst``.

    ``source: torchvision`` takes ``model`` (default ``fasterrcnn_resnet50_fpn``);
    ``src=None`` then uses torchvision's published weights (fetched into its
    cache when missing), and ``classes_file=None`` its COCO class names.
    A ``classes_file`` with another number of classes than ``src`` keeps every
    layer but the class-specific ones, which start fresh.
    """
    from detkit.config import load_config
    from detkit.io import load_file
    from detkit.engine.checkpoint import save_checkpoint
    from detkit.registry import build_detector, without_pretrained

    if source not in SOURCES:
        raise ConfigError(f"--source {source!r}: expected one of {', '.join(SOURCES)}")
    if source == "torchvision":
        model = check_torchvision_model(model or "fasterrcnn_resnet50_fpn")
        if src is None:
            src = torchvision_weights(model)
    elif src is None:
        raise ConfigError("SRC: a faster-rcnn-pytorch checkpoint file is needed")
    state = extract_state_dict(load_file(src), src)
    file_classes = _classes_in_file(state, source)
    if classes_file is not None:
        classes = read_classes(classes_file)
    elif source == "torchvision" and file_classes == len(torchvision_classes(model)):
        classes = torchvision_classes(model)
    else:
        raise ConfigError("--classes: a file with the class names, one per line, is needed for this checkpoint")
    new_classes = file_classes is not None and file_classes != len(classes)
    cfg = load_config(config_path, overrides)
    config = cfg.to_dict()
    config["model"] = without_pretrained(config["model"])  # weights come from src
    detector = build_detector(config["model"], len(classes))
    try:
        fresh = detector.import_state_dict(state, source=source, new_classes=new_classes)
    except CheckpointError as exc:
        raise CheckpointError(f"{src}: {exc}") from None
    imported = {"path": str(src), "source": source}
    if model is not None:
        imported["model"] = model
    if fresh:
        imported["fresh"] = list(fresh)  # class-specific layers left at their initialisation
    return save_checkpoint(
        dst, model=detector.state_dict(), config=config, classes=classes, imported_from=imported
    )


def _classes_in_file(state: Mapping[str, torch.Tensor], source: str) -> int | None:
    """Foreground classes of the file's box classifier, when it has one we recognise."""
    key = "roi_heads.box_predictor.cls_score.weight" if source == "torchvision" else "head.score.weight"
    w = state.get(key)
    return None if w is None or w.dim() != 2 else int(w.shape[0]) - 1
