"""Validation: predict over a loader, then compute the configured metrics.

Two steps, kept apart so that prediction can be sharded across processes and
gathered before the metrics: :func:`predict_dataset` runs the detector and
returns one :class:`ImageResult` per image (CPU tensors, boxes in the original
image's pixels); :func:`compute_metrics` feeds them to the evaluators named by
``eval.metric`` (``voc``, ``coco``, or any ``detkit.evaluator`` plugin).
:func:`evaluate` does both and can write the detections as a COCO results
JSON file; :func:`evaluate_checkpoint` (``detkit eval``) adds ``metrics.json``,
the per-class precision-recall curves and the confusion matrix.
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
from detkit.errors import CheckpointError, ConfigError, DataError

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
    """A transient rich progress bar on stderr (drawn only on a terminal), as a ``ProgressFn``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = console or Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal,
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


def write_report(
    out_dir: str | Path,
    result: dict[str, Any],
    classes: Sequence[str],
    cfg: EvalConfig,
    metrics_path: str | Path | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """``metrics.json``, ``pr_curves.png`` and ``confusion_matrix.png`` in ``out_dir``.

    The curves use VOC matching at ``eval.iou_thresh``; the confusion matrix
    counts detections at ``eval.score_thresh`` matched at ``eval.iou_thresh``.
    ``result`` must come from ``evaluate(..., keep_results=True)``.
    """
    from detkit.engine.checkpoint import atomic_write_text
    from detkit.evaluation.confusion import confusion_matrix
    from detkit.evaluation.plots import plot_confusion_matrix, plot_pr_curves
    from detkit.evaluation.voc import VOCEvaluator

    out_dir = Path(out_dir)
    results: list[ImageResult] = result["results"]
    preds = [r.prediction for r in results]
    targets = [r.target for r in results]
    voc = VOCEvaluator(VOCEvaluator.Params(iou_thresh=cfg.iou_thresh, use_07_metric=cfg.use_07_metric), classes=classes)
    voc.update(preds, targets)
    curves = voc.pr_curves()
    aps = voc.compute()["per_class"]
    matrix = confusion_matrix(preds, targets, len(classes), cfg.iou_thresh, cfg.score_thresh)
    paths = {
        "pr_curves": plot_pr_curves(curves, aps, out_dir / PR_CURVES_FILE,
                                    title=f"precision-recall at IoU {cfg.iou_thresh}"),
        "confusion_matrix": plot_confusion_matrix(
            matrix, classes, out_dir / CONFUSION_FILE,
            title=f"confusion matrix (IoU {cfg.iou_thresh}, score {cfg.score_thresh})"),
    }  # fmt: skip
    report = {k: v for k, v in result.items() if k != "results"}
    report["metrics"] = {k: _finite_or_none(v) for k, v in report["metrics"].items()}
    report["per_class"] = {e: {c: _finite_or_none(v) for c, v in aps_.items()} for e, aps_ in report["per_class"].items()}
    report["AP"] = {c: _finite_or_none(v) for c, v in report["AP"].items()}
    report["mAP"] = _finite_or_none(report["mAP"])
    report["best"] = _finite_or_none(report["best"])
    report["confusion_matrix"] = {"rows": "true class", "columns": "predicted class",
                                  "labels": [*classes, "background"], "counts": matrix.tolist(),
                                  "iou_thresh": cfg.iou_thresh, "score_thresh": cfg.score_thresh}
    report["eval"] = cfg.model_dump(mode="json")
    report.update(extra or {})
    paths["metrics"] = atomic_write_text(Path(metrics_path) if metrics_path else out_dir / METRICS_FILE,
                                         json.dumps(report, indent=2, allow_nan=False) + "\n")
    return paths


def evaluate_checkpoint(
    checkpoint: str | Path,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """``detkit eval``: evaluate a checkpoint on its (or another config's) validation split.

    Writes into ``out`` (a directory; default ``<checkpoint dir>/eval``):
    ``metrics.json``, ``pr_curves.png``, ``confusion_matrix.png`` and
    ``detections.json``.  An ``out`` ending in ``.json`` names the metrics
    file itself; the other files go beside it.
    """
    from detkit.config import apply_overrides, load_config, validate
    from detkit.data.loader import build_dataset, build_loader
    from detkit.engine.checkpoint import load_detector
    from detkit.engine.device import resolve_device

    checkpoint = Path(checkpoint)
    cfg = load_config(config_path, overrides) if config_path is not None else None
    model, ckpt = load_detector(checkpoint)
    if cfg is None:
        cfg = validate(apply_overrides(ckpt["config"], overrides), f"{checkpoint} (stored config)", overrides)
    if cfg.data.val is None:
        raise DataError(f"{config_path or checkpoint}: data.val is not set; nothing to evaluate on")
    try:
        dataset = build_dataset(cfg.data, "val")
    except DataError as exc:
        if config_path is not None:
            raise
        # The paths came from the run, not from anything the user typed: say so.
        raise DataError(f"{exc} (data.val as stored in {checkpoint}; pass --config to read other data)") from None
    if list(dataset.classes) != list(ckpt["classes"]):
        raise CheckpointError(
            f"{checkpoint}: trained for classes {list(ckpt['classes'])}, but data.val has {list(dataset.classes)}"
        )
    if out is None:
        out_dir, metrics_path = checkpoint.parent / "eval", None
    elif Path(out).suffix.lower() == ".json":
        out_dir, metrics_path = Path(out).parent, Path(out)
    else:
        out_dir, metrics_path = Path(out), None
    device = resolve_device(cfg.train.device)
    model.to(device)
    loader = build_loader(dataset, batch_size=cfg.data.batch_size, shuffle=False,
                          num_workers=cfg.data.num_workers, seed=cfg.train.seed)
    result = evaluate(model, loader, dataset.classes, cfg.eval, device,
                      detections_path=out_dir / DETECTIONS_FILE, keep_results=True)
    paths = write_report(out_dir, result, dataset.classes, cfg.eval, metrics_path,
                         extra={"checkpoint": str(checkpoint)})
    result.pop("results")
    console = console or Console()
    console.print(metrics_table(result, title=str(checkpoint)))
    console.print(f"wrote {paths['metrics']}, {paths['pr_curves'].name}, {paths['confusion_matrix'].name} "
                  f"and {DETECTIONS_FILE} to {out_dir}", markup=False, highlight=False, soft_wrap=True)
    result["files"] = {k: str(v) for k, v in paths.items()} | {"detections": str(out_dir / DETECTIONS_FILE)}
    return result
