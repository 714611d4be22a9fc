"""Validation: predict over a loader, then compute the configured metrics.

Two steps, kept apart so that prediction can be sharded across processes and
gathered before the metrics: :func:`predict_dataset` runs the detector and
returns one :class:`ImageResult` per image (CPU tensors, boxes in the original
image's pixels); :func:`compute_metrics` feeds them to the evaluators named by
``eval.metric`` (``voc``, ``coco``, or any ``detkit.evaluator`` plugin).
:func:`evaluate` does both and can write the detections as a COCO results
JSON file.  ``detkit eval`` (:mod:`detkit.engine.eval_checkpoint`) adds
``metrics.json``, the per-class precision-recall curves and the confusion
matrix, and shards prediction under ``torchrun``.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn

from detkit.sections import EvalConfig
from detkit.errors import ConfigError

ProgressFn = Callable[[int, int], None]
"""``progress(images_done, images_total)``, called after every batch."""

DETECTIONS_FILE = "detections.json"
METRICS_FILE = "metrics.json"
PR_CURVES_FILE = "pr_curves.png"
CONFUSION_FILE = "confusion_matrix.png"


@dataclass
class ImageResult:
    """One evaluated image: its id, the detections and the ground truth, in original pixels (CPU)."""

    image_id: str
    prediction: dict[str, Tensor]
    target: dict[str, Tensor]


def _images_in(loader: Any, max_images: int | None) -> int:
    sampler = getattr(loader, "sampler", None)
    try:
        total = len(sampler) if sampler is not None else len(loader.dataset)
    except TypeError:
        total = len(loader.dataset)
    return min(total, max_images) if max_images else total


@contextmanager
def progress_bar(description: str, total: int, console: Console | None = None) -> Iterator[ProgressFn]:
    """A transient rich progress bar on stderr (drawn only on a terminal, and not on a quiet console), as a
    ``ProgressFn``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = console or Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True, disable=console.quiet or not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done, _total: bar.update(task, completed=done)


@torch.inference_mode()
def predict_dataset(
    model: nn.Module,
    loader: Any,
    cfg: EvalConfig,
    device: torch.device,
    progress: ProgressFn | None = None,
) -> list[ImageResult]:
    """Run the detector's forward, in eval mode, over ``loader`` (up to ``cfg.max_images``); per image, in loader order.

    The same forward as ``detkit predict`` on the same images, one at a time:
    the detector resizes them itself and returns boxes in their own pixels.
    """
    was_training = model.training
    model.eval()
    total = _images_in(loader, cfg.max_images)
    results: list[ImageResult] = []
    if progress is not None:
        progress(0, total)
    try:
        with model.detection_settings(score_thresh=cfg.score_thresh, nms_iou=cfg.nms_iou):
            for batch in loader:
                batch = batch.to(device)
                # One image per forward, as predict runs it: padding images of other sizes into
                # one batch changes the features near their borders, and so the detections.
                preds = [model([image])[0] for image in batch.images]
                for i, (pred, tgt) in enumerate(zip(preds, batch.targets)):
                    results.append(ImageResult(
                        image_id=batch.image_ids[i],
                        prediction={"boxes": pred["boxes"].float().cpu(), "scores": pred["scores"].float().cpu(),
                                    "labels": pred["labels"].long().cpu()},
                        target={"boxes": tgt["boxes"].float().cpu(), "labels": tgt["labels"].long().cpu(),
                                "difficult": tgt["difficult"].bool().cpu()},
                    ))  # fmt: skip
                    if cfg.max_images and len(results) >= cfg.max_images:
                        break
                if progress is not None:
                    progress(len(results), total)
                if cfg.max_images and len(results) >= cfg.max_images:
                    break
    finally:
        model.train(was_training)
    return results


def build_evaluators(cfg: EvalConfig, classes: Sequence[str], category_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """``{type: evaluator}`` for every entry of ``eval.metric``, in order.

    A ``voc`` evaluator without its own ``iou_thresh``/``use_07_metric`` takes
    ``eval.iou_thresh``/``eval.use_07_metric``.
    """
    from detkit.registry import registry

    evaluators: dict[str, Any] = {}
    for spec in cfg.metric:
        params = spec.params
        fill = {k: getattr(cfg, k) for k in ("iou_thresh", "use_07_metric")
                if k in type(params).model_fields and getattr(params, k) is None}
        if fill:
            spec = type(spec)(spec.kind, spec.type, params.model_copy(update=fill))
        evaluators[spec.type] = spec.build(classes=list(classes), category_ids=category_ids)
    return evaluators


def best_key(cfg: EvalConfig, evaluators: dict[str, Any]) -> str:
    """``eval.best``, or the first evaluator's headline (``voc/mAP``, ``coco/AP``)."""
    if cfg.best is not None:
        return cfg.best
    first = next(iter(evaluators))
    return f"{first}/{evaluators[first].headline}"


def dataset_category_ids(dataset: Any) -> list[int] | None:
    """The data set's own class ids (COCO's ``category_ids``), looking through wrappers such as
    ``TransformedDataset``; None when it has none (labels ``k`` are then written as ``k + 1``)."""
    for _ in range(4):
        if dataset is None:
            return None
        ids = getattr(dataset, "category_ids", None)
        if ids is not None:
            return [int(i) for i in ids]
        dataset = getattr(dataset, "dataset", None)
    return None


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def compute_metrics(
    results: Sequence[ImageResult],
    classes: Sequence[str],
    cfg: EvalConfig,
    category_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Every configured metric over ``results``.

    Returns ``{"metrics": {"voc/mAP": ..., "coco/AP": ..., ...}, "per_class":
    {"voc": {class: AP}, ...}, "per_class_metric": {"voc": "AP50 (VOC07
    11-pt)", "coco": "AP@[.5:.95]"}, "best_key": "coco/AP", "best": float,
    "images": N}`` plus, for callers of the single-metric days, ``"mAP"`` (the
    ``best`` value) and ``"AP"`` (the first evaluator's per-class APs).
    """
    evaluators = build_evaluators(cfg, classes, category_ids)
    preds = [r.prediction for r in results]
    targets = [r.target for r in results]
    metrics: dict[str, float] = {}
    per_class: dict[str, dict[str, float]] = {}
    # What each per-class column holds: "AP" alone hides the IoU and the interpolation.
    labels = {name: str(getattr(ev, "per_class_metric", None) or ev.headline) for name, ev in evaluators.items()}
    for name, ev in evaluators.items():
        ev.update(preds, targets)
        out = ev.compute()
        per_class[name] = dict(out.pop("per_class", {}))
        for key, value in out.items():
            if key != "iou_thresh" and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{name}/{key}"] = float(value)
    key = best_key(cfg, evaluators)
    if key not in metrics:
        raise ConfigError(f"eval.best: {key!r} is not a metric; choose one of {', '.join(metrics)}")
    first = next(iter(per_class))
    return {
        "metrics": metrics, "per_class": per_class, "per_class_metric": labels, "best_key": key, "best": metrics[key],
        "mAP": metrics[key], "AP": per_class[first], "images": len(results),
    }


def _json_image_id(image_id: str) -> int | str:
    """COCO results use integer image ids; keep a string id that is not a plain integer (VOC's 000005)."""
    return int(image_id) if image_id.isdigit() and str(int(image_id)) == image_id else image_id


def write_detections(path: str | Path, results: Sequence[ImageResult], category_ids: Sequence[int] | None = None) -> Path:
    """The detections as a COCO results JSON list, in original pixels, written atomically."""
    from detkit.engine.checkpoint import atomic_write_text
    from detkit.evaluation.coco import coco_results

    rows = coco_results([r.prediction for r in results], [_json_image_id(r.image_id) for r in results], category_ids)
    return atomic_write_text(path, json.dumps(rows, separators=(",", ":")) + "\n")


def evaluate(
    model: nn.Module,
    loader: Any,
    classes: Sequence[str],
    cfg: EvalConfig,
    device: torch.device,
    *,
    detections_path: str | Path | None = None,
    progress: ProgressFn | None = None,
    keep_results: bool = False,
) -> dict[str, Any]:
    """Predict over ``loader`` and compute ``cfg.metric`` (see :func:`compute_metrics`).

    ``detections_path``: also write the detections there (COCO results JSON).
    ``progress``: called after each batch; without it a transient bar is drawn
    on stderr when that is a terminal.  ``keep_results``: add the per-image
    :class:`ImageResult` list under ``"results"`` (for plots).
    """
    category_ids = dataset_category_ids(getattr(loader, "dataset", None))
    if progress is None:
        with progress_bar("evaluating", _images_in(loader, cfg.max_images)) as bar:
            results = predict_dataset(model, loader, cfg, device, bar)
    else:
        results = predict_dataset(model, loader, cfg, device, progress)
    out = compute_metrics(results, classes, cfg, category_ids)
    if detections_path is not None:
        write_detections(detections_path, results, category_ids)
    if keep_results:
        out["results"] = results
    return out


def metrics_table(result: dict[str, Any], title: str = "validation") -> Group:
    """Per-class figures, one column per evaluator headed by its metric, then one line of metrics per evaluator.

    The title gets the number of images evaluated (``result["images"]``).
    """
    per_class: dict[str, dict[str, float]] = result.get("per_class") or {"voc": result.get("AP", {})}
    metrics: dict[str, float] = result.get("metrics") or {"voc/mAP": result["mAP"]}
    labels: dict[str, str] = result.get("per_class_metric") or {}
    if result.get("images") is not None:
        title = f"{title} ({result['images']} images)"

    def fmt(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    table = Table(title=title)
    table.add_column("class")
    for name in per_class:
        table.add_column(f"{name} {labels.get(name, 'AP')}", justify="right")
    for c in next(iter(per_class.values()), {}):
        table.add_row(c, *(fmt(per_class[name].get(c)) for name in per_class))
    lines = {}
    for key, value in metrics.items():
        evaluator, _, metric = key.partition("/")
        # key=value: a line too long for the terminal wraps between metrics, never inside one
        lines.setdefault(evaluator, []).append(f"{metric}={fmt(value)}")
    text = Text()
    for evaluator, parts in lines.items():
        text.append(f"{evaluator}: ", style="bold")
        text.append("  ".join(parts) + "\n")
    if result.get("best_key"):
        text.append(f"best.pt follows {result['best_key']}", style="dim")
    return Group(table, text)
