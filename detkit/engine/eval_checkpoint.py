"""``detkit eval``: evaluate a checkpoint and write its report, in one process or sharded under ``torchrun``.

Under ``torchrun --nproc-per-node N -m detkit.cli eval CKPT`` (or
``detkit-torchrun``) each process predicts every N-th validation image
(:func:`detkit.engine.distributed.shard_loader`), rank 0 gathers the per-image
results in data-set order and alone computes the metrics and writes the files:
the same metrics and the same ``detections.json``, byte for byte, as one
process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from detkit.engine.evaluate import (
    CONFUSION_FILE,
    DETECTIONS_FILE,
    METRICS_FILE,
    PR_CURVES_FILE,
    ImageResult,
    _finite_or_none,
    _images_in,
    compute_metrics,
    dataset_category_ids,
    metrics_table,
    predict_dataset,
    progress_bar,
    write_detections,
)
from detkit.errors import CheckpointError, DataError
from detkit.sections import EvalConfig

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
) -> dict[str, Any] | None:
    """``detkit eval``: evaluate a checkpoint on its (or another config's) validation split.

    Writes into ``out`` (a directory; default ``<checkpoint dir>/eval``):
    ``metrics.json``, ``pr_curves.png``, ``confusion_matrix.png`` and
    ``detections.json``.  An ``out`` ending in ``.json`` names the metrics
    file itself; the other files go beside it.  Under ``torchrun`` every
    process calls it; rank 0 returns the result, the others None.
    """
    import torch

    from detkit.config import apply_overrides, load_config, validate
    from detkit.engine.checkpoint import load_detector
    from detkit.engine.device import resolve_device
    from detkit.engine.distributed import init_from_env, peer_failures_exit_quietly, shutdown

    checkpoint = Path(checkpoint)
    cfg = load_config(config_path, overrides) if config_path is not None else None
    # ``--set model.*`` changes test-time settings of the stored model (input size, score
    # threshold, proposals); the weights stay the checkpoint's.  Without this the detector
    # would be built from the stored section and such a --set silently ignored.
    model_sets = [o for o in overrides if o.partition("=")[0].strip().startswith("model.")]
    with_sets = (lambda stored: validate(apply_overrides(stored, model_sets), f"{checkpoint} (stored config)",
                                         model_sets).model.to_dict()) if model_sets else None
    model, ckpt = load_detector(checkpoint, model_section=with_sets)
    if cfg is None:
        cfg = validate(apply_overrides(ckpt["config"], overrides), f"{checkpoint} (stored config)", overrides)
    device = resolve_device(cfg.train.device)
    info = init_from_env(device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    console = console or Console(quiet=not info.is_main)  # rank 0 alone talks
    with peer_failures_exit_quietly(info):
        result = _evaluate(checkpoint, config_path, cfg, model, ckpt, out, console, device, info)
    shutdown(info)  # after a finished run only, as in training: see detkit.engine.train.train
    return result


def _evaluate(checkpoint: Path, config_path: Any, cfg: Any, model: Any, ckpt: dict[str, Any], out: Any,
              console: Console, device: Any, info: Any) -> dict[str, Any] | None:
    from detkit.data.loader import build_dataset, build_loader
    from detkit.engine.distributed import agree_on_setup_errors, gather_results, shard_loader

    with agree_on_setup_errors(info):
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
    model.to(device)
    loader = build_loader(dataset, batch_size=cfg.data.batch_size, shuffle=False,
                          num_workers=cfg.data.num_workers, seed=cfg.train.seed)
    if info.enabled:  # this rank's every N-th image; eval.max_images counts the whole set's
        loader = shard_loader(loader, info, cfg.eval.max_images)
    bar_console = Console(stderr=True, quiet=not info.is_main)
    with progress_bar("evaluating", _images_in(loader, cfg.eval.max_images), bar_console) as bar:
        results = predict_dataset(model, loader, cfg.eval, device, bar)
    gathered = gather_results(results, info)
    if gathered is None:
        return None
    category_ids = dataset_category_ids(dataset)
    result = compute_metrics(gathered, dataset.classes, cfg.eval, category_ids)
    write_detections(out_dir / DETECTIONS_FILE, gathered, category_ids)
    paths = write_report(out_dir, {**result, "results": gathered}, dataset.classes, cfg.eval, metrics_path,
                         extra={"checkpoint": str(checkpoint)})
    console.print(metrics_table(result, title=str(checkpoint)))
    console.print(f"wrote {paths['metrics']}, {paths['pr_curves'].name}, {paths['confusion_matrix'].name} "
                  f"and {DETECTIONS_FILE} to {out_dir}", markup=False, highlight=False, soft_wrap=True)
    if info.enabled:
        console.print(f"predicted by {info.world_size} processes", markup=False, highlight=False)
    result["files"] = {k: str(v) for k, v in paths.items()} | {"detections": str(out_dir / DETECTIONS_FILE)}
    return result
