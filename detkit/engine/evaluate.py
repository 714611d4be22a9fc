"""Validation: run ``predict`` over a loader and compute VOC mAP."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from detkit.engine.config import EvalConfig
from detkit.errors import CheckpointError, DataError


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Any,
    classes: Sequence[str],
    cfg: EvalConfig,
    device: torch.device,
) -> dict[str, Any]:
    """VOC-style mAP of ``model`` on ``loader`` (boxes compared in network-input pixels)."""
    from detkit.evaluation.voc import VOCEvaluator

    was_training = model.training
    model.eval()
    evaluator = VOCEvaluator(list(classes), iou_thresh=cfg.iou_thresh, use_07_metric=cfg.use_07_metric)
    seen = 0
    try:
        for batch in loader:
            batch = batch.to(device)
            sizes = batch.image_sizes.tolist()
            images = [img[:, :h, :w] for img, (h, w) in zip(batch.images, sizes)]
            preds = model.predict(images, score_thresh=cfg.score_thresh, nms_iou=cfg.nms_iou, resize=False)
            evaluator.update(preds, batch.targets)
            seen += len(images)
            if cfg.max_images and seen >= cfg.max_images:
                break
    finally:
        model.train(was_training)
    result = evaluator.compute()
    result["images"] = seen
    return result


def metrics_table(result: dict[str, Any], title: str = "validation") -> Table:
    table = Table(title=title, caption=f"mAP = {result['mAP']:.4f}")
    table.add_column("class")
    table.add_column("AP", justify="right")
    for name, ap in result.get("AP", {}).items():
        table.add_row(name, "-" if ap is None or (isinstance(ap, float) and math.isnan(ap)) else f"{ap:.4f}")
    return table


def evaluate_checkpoint(
    checkpoint: Path, config_path: Path | None = None, overrides: Sequence[str] = (), out: Path | None = None
) -> dict[str, Any]:
    """``detkit eval``: evaluate a checkpoint on its (or another config's) validation split."""
    from detkit.config import apply_overrides, load_config, validate
    from detkit.data.loader import build_dataset, build_loader
    from detkit.engine.checkpoint import atomic_write_text, load_detector
    from detkit.engine.device import resolve_device

    cfg = load_config(config_path, overrides) if config_path is not None else None
    model, ckpt = load_detector(checkpoint)
    if cfg is None:
        cfg = validate(apply_overrides(ckpt["config"], overrides), f"{checkpoint} (stored config)")
    if cfg.data.val is None:
        raise DataError(f"{config_path or checkpoint}: data.val is not set; nothing to evaluate on")
    dataset = build_dataset(cfg.data, "val")
    if list(dataset.classes) != list(ckpt["classes"]):
        raise CheckpointError(
            f"{checkpoint}: trained for classes {list(ckpt['classes'])}, but data.val has {list(dataset.classes)}"
        )
    device = resolve_device(cfg.train.device)
    model.to(device)
    loader = build_loader(dataset, batch_size=cfg.data.batch_size, shuffle=False,
                          num_workers=cfg.data.num_workers, seed=cfg.train.seed)
    result = evaluate(model, loader, dataset.classes, cfg.eval, device)
    Console().print(metrics_table(result, title=str(checkpoint)))
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2, default=_json_default) + "\n")
    return result


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(type(x).__name__)
