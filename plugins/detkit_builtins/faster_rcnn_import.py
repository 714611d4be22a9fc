"""Weights from elsewhere into :class:`~detkit_builtins.faster_rcnn.FasterRCNN`.

* :func:`import_state_dict`: checkpoints of faster-rcnn-pytorch (``extractor``
  trunk, ``rpn.{conv1,score,loc}``, ``head.classifier`` tail,
  ``head.{cls_loc,score}``) and torchvision (:mod:`detkit_builtins.import_torchvision`).
* :func:`upgrade_checkpoint`: detkit checkpoints of the earlier layout, whose
  modules were ``extractor``/``head`` and whose trainer held the target
  creators and losses, in today's layout (``backbone``/``roi_head``, stages
  owning their training).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from torch import Tensor

from detkit.errors import CheckpointError
from detkit.io import state_mismatches

# Layers whose shape depends on the number of classes: with another class
# list they start fresh (fine-tuning to new classes), everything else loads.
CLASS_SPECIFIC = ("roi_head.score.", "roi_head.cls_loc.")
TAIL = "roi_head.box_head.tail."


def import_state_dict(model: Any, state_dict: Mapping[str, Tensor], source: str, new_classes: bool) -> list[str]:
    """Load ``state_dict`` saved by ``source`` into ``model``; returns the keys left at their initialisation.

    Missing or unexpected keys and wrong shapes raise a CheckpointError listing them.
    """
    own = model.state_dict()
    if source == "torchvision":
        from detkit_builtins import import_torchvision as tv

        mapped, unknown = tv.map_state(state_dict, own)
        to_theirs = tv.reverse_for(state_dict)
        if unknown:
            shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            raise CheckpointError(f"torchvision checkpoint has keys outside the layouts of its Faster R-CNN models: {shown}")
    elif source == "faster-rcnn-pytorch":
        trunk = getattr(model.backbone, "trunk_name", None)
        if trunk is None or model.multi_level:
            raise CheckpointError(
                f"backbone {type(model.backbone).__name__} has no faster-rcnn-pytorch layout "
                "(use vgg16 or resnet50 without out_features)"
            )
        rules = [("extractor.", f"backbone.{trunk}."), ("head.classifier.", TAIL), ("head.", "roi_head."),
                 ("rpn.", "rpn.")]

        def to_theirs(key: str) -> str:
            return _rename(key, [(new, old) for old, new in rules])

        mapped = {_rename(k, rules): v for k, v in state_dict.items()}
    else:
        raise CheckpointError(f"unknown checkpoint source {source!r}; supported: faster-rcnn-pytorch, torchvision")
    fresh: list[str] = []
    if new_classes:
        fresh = sorted(
            k for k in own if k.startswith(CLASS_SPECIFIC) and k in mapped and mapped[k].shape != own[k].shape
        )
        for k in fresh:
            mapped[k] = own[k]
    problems = state_mismatches(own, mapped, to_theirs, shown=10)
    if problems:
        raise CheckpointError(
            f"{source} checkpoint does not fit this model ({type(model.backbone).__name__}, "
            f"{model.num_classes} classes); " + "; ".join(problems)
        )
    model.load_state_dict(mapped, strict=True)
    return fresh


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old):]
    return key


# detkit's earlier module names -> today's, first match wins.
_LEGACY_KEYS = [("extractor.", "backbone."), ("head.classifier.", TAIL), ("head.", "roi_head.")]
_SIZE_KEYS = ("min_size", "max_size", "fixed_size", "scale_jitter")


def is_legacy(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("extractor.", "head.")) for k in state)


def upgrade_checkpoint(config: dict[str, Any], state: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, state)`` of an earlier-layout checkpoint in today's layout; current ones unchanged."""
    if not is_legacy(state):
        return config, dict(state)
    cfg = copy.deepcopy(config)
    model = cfg.get("model", {})
    trainer = cfg.get("train", {}).get("trainer", {}) or {}
    rpn = model.setdefault("rpn", {"type": "rpn"})
    for old, new in (("anchor_target", "anchor_target"), ("rpn_loc_loss", "loc_loss"), ("rpn_cls_loss", "cls_loss")):
        if old in trainer:
            rpn[new] = trainer.pop(old)
    head = dict(model.get("roi_head") or {"type": "roi_head"})
    new_head: dict[str, Any] = {"type": "roi_head"}
    if head.get("type") == "multiscale_roi_head":
        new_head["pooler"] = {"type": "multiscale_roi_align", "output_size": head.get("roi_size", 7), **{
            k: head[k] for k in ("in_features", "sampling_ratio", "aligned", "canonical_scale", "canonical_level")
            if k in head}}
        new_head["box_head"] = {"type": "two_mlp", **{k: head[k] for k in ("representation_size", "norm") if k in head}}
    else:
        pool = head.get("pool", "roi_pool")
        pooler = {"type": pool, **{k: head[k] for k in ("mapping",) if k in head}}
        if pool == "roi_align":
            pooler.update({k: head[k] for k in ("sampling_ratio", "aligned") if k in head})
        new_head["pooler"] = pooler
        new_head["box_head"] = {"type": "backbone_tail"}
    for old, new in (("proposal_target", "proposal_target"), ("roi_loc_loss", "loc_loss"), ("roi_cls_loss", "cls_loss")):
        if old in trainer:
            new_head[new] = trainer.pop(old)
    if "loc_normalize_std" in model:
        new_head["loc_normalize_std"] = model.pop("loc_normalize_std")
    if head.get("cls_prior") is not None:
        new_head["cls_prior"] = head["cls_prior"]
    model["roi_head"] = new_head
    preprocess = model.setdefault("preprocess", {})
    # The batch padding is the model's (preprocess.size_divisible), as predict always had it.
    cfg.get("data", {}).pop("size_divisor", None)
    transforms = cfg.get("data", {}).get("transforms")
    if isinstance(transforms, dict):
        jitter = transforms.get("scale_jitter")
        if jitter and "min_size" in preprocess:
            base = preprocess["min_size"]
            preprocess["train_min_sizes"] = sorted({round(base * jitter[0]), base, round(base * jitter[1])})
        for key in _SIZE_KEYS:
            transforms.pop(key, None)
    elif isinstance(transforms, list):
        cfg["data"]["transforms"] = [t for t in transforms if not (isinstance(t, dict) and t.get("type") == "resize")]
    return cfg, {_rename(k, _LEGACY_KEYS): v for k, v in state.items()}
