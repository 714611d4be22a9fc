"""Training hooks: everything the training loop does besides the step itself.

The loop (:class:`detkit.engine.train.TrainLoop`) is short: for each epoch,
for each step, run the step; around those it calls every hook's
``before_train``, ``before_epoch``, ``before_step``, ``after_step``,
``after_epoch`` and ``after_train``, in the order of the hooks' ``priority``
(lower first; hooks of equal priority keep the order they were added in).
``after_train`` runs even when training fails, on every hook whose
``before_train`` ran; ``loop.completed`` tells whether the run finished.

Built-in hooks, in order::

    priority  hook                  what it does
       0      ProgressHook          rich progress bar (plain lines off a terminal); shows records
       1      MetricsFileHook       metrics.jsonl, rank 0 only
       5      FrozenBackboneHook    before_epoch: freeze/unfreeze Detector.backbone_parameters()
       6      DistributedHook       under torchrun: the DDP wrapper of the detector (trainer.module),
                                    rebuilt when requires_grad changes (detkit.engine.distributed)
      10      LRScheduleHook        after_step: advance the per-iteration LR schedule
      20      EMAHook               after_step: update the weights' moving average (train.ema;
                                    in detkit.engine.ema)
      30      NonFiniteLossHook     at each log point: stop on inf/NaN or a diverging loss
                                    (train.loss_guard; in detkit.engine.guards)
      40      LoggingHook           at each log point: a "train" record (losses, lr, images/s);
                                    after_epoch: an "augment" record (boxes dropped by crops)
      45      EvalHook              after_epoch: evaluate (EMA weights if any), track the best
      50      (plugin hooks, unless their class sets another priority; the trackers mlflow,
                                    wandb and tensorboard of detkit.engine.trackers among them)
      60      CheckpointHook        last.pt by epoch and by iteration, best.pt on improvement
     100      SummaryHook           after_train: loss plot, AP table, summary line

A plugin hook subclasses :class:`detkit.interfaces.Hook` (the one hook base
class), declares a pydantic ``Params`` class, takes its validated instance as
its constructor's first argument (``__init__(self, params=None)``; ``None``:
the Params defaults), is registered in the entry-point group ``detkit.hook``
and is listed in the config::

    train:
      hooks:
        - {type: my_hook, every: 100}

A hook that needs a package detkit does not install names it in ``requires =
(("module", "pip requirement"),)``: a missing one is refused before a run is
built (:func:`detkit.config.check_requirements`).

A hook sees the loop as ``self.loop`` (see :class:`TrainLoop` for what it
holds: model, trainer, optimizer, amp, epoch, step, the last step's losses,
...).  Records go through ``self.loop.emit(record)`` to the metrics file and
the display; ``state_dict``/``load_state_dict`` put a hook's state in the
checkpoints, so resuming restores it.  See docs/engine.md.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from detkit.engine.ema import EMAHook  # noqa: F401 (re-exported: detkit.engine.hooks.EMAHook)
from detkit.engine.evaluate import evaluate, metrics_table
from detkit.engine.guards import NonFiniteLossHook  # noqa: F401 (re-exported)
from detkit.engine.logging import MetricsWriter, Throughput, TrainDisplay, plot_losses, trim_metrics
from detkit.errors import ConfigError
from detkit.interfaces import Hook

VAL_DETECTIONS = "val_detections.json"  # the latest periodic evaluation's detections (COCO results)


# ------------------------------------------------------------------- display
class ProgressHook(Hook):
    """A rich progress bar (epoch, step/total, ETA, images/s) with the losses under it."""

    priority = 0

    def __init__(self) -> None:
        self.display: TrainDisplay | None = None

    def before_train(self) -> None:
        loop = self.loop
        self.display = TrainDisplay(loop.console, loop.total_steps, loop.step)
        self.display.__enter__()

    def after_step(self) -> None:
        self.display.advance(self.loop.epoch, self.loop.epochs)

    def on_record(self, record: dict[str, Any]) -> None:
        if self.display is None:
            return
        if record.get("type") == "train":
            self.display.log(record, self.loop.loss_names)
        elif record.get("type") == "eval" and "mAP" in record:
            key = record.get("best_key") or f"mAP@{self.loop.cfg.eval.iou_thresh}"
            self.display.message(f"epoch {record['epoch'] + 1}: val {key} {record['mAP']:.4f}")
        elif record.get("type") == "augment":
            share = " (this process's share)" if self.loop.dist.enabled else ""
            self.display.message(f"epoch {record['epoch'] + 1}: augmentation dropped {record['boxes_dropped']} "
                                 f"boxes (degenerate after a crop), kept {record['boxes_kept']}{share}")

    def after_train(self) -> None:
        if self.display is not None:
            self.display.__exit__(None, None, None)
            self.display = None


class MetricsFileHook(Hook):
    """Every record as one JSON line in ``metrics.jsonl``; rank 0 only."""

    priority = 1

    def __init__(self) -> None:
        self.writer: MetricsWriter | None = None

    def before_train(self) -> None:
        if self.loop.is_main:
            # Records after the step this run starts from (a resume) are trained again; a
            # torn last line from a crash would swallow the next record. Both go first.
            trim_metrics(self.loop.run_dir / "metrics.jsonl", self.loop.step)
            self.writer = MetricsWriter(self.loop.run_dir / "metrics.jsonl")

    def on_record(self, record: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(record)

    def after_train(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ------------------------------------------------------------ training state
class FrozenBackboneHook(Hook):
    """For the first ``train.freeze_backbone_epochs`` epochs the backbone trunk does not train.

    Switches ``requires_grad`` of :meth:`Detector.backbone_parameters`; a
    parameter frozen by the backbone's own config (``freeze_stages``) stays frozen.
    """

    priority = 5

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.params: list[torch.nn.Parameter] = []
        self.trainable: dict[int, bool] = {}

    def before_train(self) -> None:
        if not self.epochs:
            return
        try:
            self.params = list(self.loop.model.backbone_parameters())
        except NotImplementedError as exc:
            raise ConfigError(f"train.freeze_backbone_epochs: {exc}") from None
        self.trainable = {id(p): p.requires_grad for p in self.params}

    def before_epoch(self) -> None:
        frozen = self.loop.epoch < self.epochs
        self.loop.backbone_frozen = frozen
        for p in self.params:
            p.requires_grad_(False if frozen else self.trainable[id(p)])


class LRScheduleHook(Hook):
    """Advances the per-iteration learning-rate schedule after each optimizer step."""

    priority = 10

    def after_step(self) -> None:
        self.loop.scheduler.step()


# ------------------------------------------------------------------ logging
class LoggingHook(Hook):
    """Every ``train.log_interval`` steps (and at each epoch's end) emits a "train" record.

    The record holds the window's mean of each named loss the trainer returned,
    the learning rate, images/s over the window (all ranks) and whether the
    backbone is frozen.
    """

    priority = 40

    def before_epoch(self) -> None:
        self.throughput = Throughput()
        self.loop.window.reset()

    def after_step(self) -> None:
        loop = self.loop
        self.throughput.add(loop.step_images)
        if not loop.log_now():
            return
        record = {"type": "train", "epoch": loop.epoch, "step": loop.step, **loop.window.mean(),
                  "lr": loop.optimizer.param_groups[0]["lr"], "images_per_s": self.throughput.rate(),
                  "backbone_frozen": loop.backbone_frozen}
        loop.window.reset()
        loop.emit(record)

    def after_epoch(self) -> None:
        kept, dropped = self.loop.augment_boxes
        if dropped:  # boxes a crop left degenerate: the augmentation's share of lost ground truth
            self.loop.emit({"type": "augment", "epoch": self.loop.epoch, "step": self.loop.step,
                            "boxes_kept": kept, "boxes_dropped": dropped})


# --------------------------------------------------------------- evaluation
class EvalHook(Hook):
    """Evaluates on ``data.val`` every ``eval.interval`` epochs and at the end.

    Emits an "eval" record, keeps ``loop.eval_result`` and ``loop.best_metric``
    and sets ``loop.improved`` for the checkpoint hook.  Runs under the other
    hooks' evaluation weights (the EMA).  Under torchrun every rank predicts
    on its shard of the images and rank 0 computes the metrics.  With
    ``keep_results`` (a tracker hook sets it) the latest evaluation's per-image
    results stay in ``results`` for plots, outside ``loop.eval_result`` and so
    outside the checkpoints.
    """

    priority = 45

    def __init__(self) -> None:
        self.val_loader = None
        self.keep_results = False
        self.results: list[Any] | None = None

    def due(self) -> bool:
        loop = self.loop
        interval = loop.cfg.eval.interval
        done = loop.epoch + 1
        return loop.val_set is not None and bool(interval) and (done % interval == 0 or done == loop.epochs)

    def before_epoch(self) -> None:
        self.loop.improved = False

    def after_epoch(self) -> None:
        loop = self.loop
        if not self.due():
            return
        result = self.run_evaluation()
        if result is None:  # a rank other than 0: its predictions went to rank 0
            return
        self.results = result.pop("results", None)
        loop.eval_result = result
        # NaN (a class without ground truth) is not JSON: write null.
        aps = {k: (None if v is None or math.isnan(v) else v) for k, v in result.get("AP", {}).items()}
        # "mAP" is the eval.best value (named best_key); every metric follows as "<evaluator>/<name>".
        metrics = {k: (None if math.isnan(v) else v) for k, v in result.get("metrics", {}).items()}
        loop.emit({"type": "eval", "epoch": loop.epoch, "step": loop.step, "mAP": result["mAP"],
                   "best_key": result.get("best_key"), **metrics, "AP": aps})
        score = self.score(result)
        if score > loop.best_metric:
            loop.best_metric = score
            loop.improved = True

    @staticmethod
    def score(result: dict[str, Any]) -> float:
        """The number best.pt follows (``eval.best``)."""
        return float(result.get("best", result["mAP"]))

    def run_evaluation(self) -> dict[str, Any] | None:
        """The one place the training loop evaluates (None on ranks other than 0)."""
        from detkit.data.loader import build_loader
        from detkit.engine.distributed import evaluate_distributed

        loop = self.loop
        cfg = loop.cfg
        if self.val_loader is None:  # built once: its workers persist between evaluations
            self.val_loader = build_loader(loop.val_set, batch_size=cfg.data.batch_size, shuffle=False,
                                           num_workers=cfg.data.num_workers, seed=cfg.train.seed)
        # The detections of the latest evaluation, in the COCO results format (rank 0 writes).
        detections = loop.run_dir / VAL_DETECTIONS if loop.is_main else None
        with loop.eval_weights(), self.progress() as progress:
            if loop.dist.enabled:
                return evaluate_distributed(loop.model, self.val_loader, loop.classes, cfg.eval, loop.device,
                                            loop.dist, detections_path=detections, progress=progress,
                                            keep_results=self.keep_results)
            return evaluate(loop.model, self.val_loader, loop.classes, cfg.eval, loop.device,
                            detections_path=detections, progress=progress, keep_results=self.keep_results)

    @contextmanager
    def progress(self) -> Iterator[Any]:
        """A validation bar under the training bar (ProgressHook's display); nothing without one."""
        display = next((h.display for h in self.loop.hooks if isinstance(h, ProgressHook) and h.display), None)
        if display is None:
            yield lambda done, total: None
            return
        with display.subtask(f"{self.loop.epoch + 1}/{self.loop.epochs} val") as update:
            yield update


# -------------------------------------------------------------- checkpoints
class CheckpointHook(Hook):
    """``last.pt`` every ``train.checkpoint_interval`` epochs, every ``train.checkpoint_every_iters``
    steps and at the end; ``best.pt`` when the evaluation improved.  Rank 0 writes (atomically)."""

    priority = 60

    def __init__(self, epoch_interval: int, every_iters: int | None):
        self.epoch_interval = epoch_interval
        self.every_iters = every_iters

    def _iter_due(self) -> bool:
        return bool(self.every_iters) and self.loop.step % self.every_iters == 0

    def after_step(self) -> None:
        loop = self.loop
        # The step that ends an epoch is saved after the epoch's evaluation.
        if loop.epoch_step < loop.epoch_steps[loop.epoch] and self._iter_due():
            loop.save_checkpoint(loop.run_dir / "last.pt")

    def after_epoch(self) -> None:
        loop = self.loop
        done = loop.epoch + 1
        if loop.improved:
            loop.save_checkpoint(loop.run_dir / "best.pt")
        if done % self.epoch_interval == 0 or done == loop.epochs or self._iter_due():
            loop.save_checkpoint(loop.run_dir / "last.pt")


class SummaryHook(Hook):
    """At the end of a finished run (rank 0): the loss plot, the AP table and one summary line."""

    priority = 100

    def after_train(self) -> None:
        loop = self.loop
        if not (loop.completed and loop.is_main):
            return
        run_dir: Path = loop.run_dir
        plot = plot_losses(run_dir / "metrics.jsonl", run_dir / "losses.png", loop.loss_names or None)
        minutes = (time.perf_counter() - loop.t_start) / 60
        if loop.eval_result is not None:
            loop.console.print(metrics_table(loop.eval_result, title="val"))  # titled with the images evaluated
        last = run_dir / "last.pt"
        summary = f"done in {minutes:.1f} min: " + (str(last) if last.is_file() else "no checkpoint written")
        # Only files that exist are named: a run resumed into a new directory may have
        # its best score from the checkpoint and no best.pt of its own.
        best = run_dir / "best.pt"
        if loop.val_set is not None and loop.best_metric > -math.inf and best.is_file():
            key = (loop.eval_result or {}).get("best_key") or f"mAP@{loop.cfg.eval.iou_thresh}"
            summary += f", best val {key} {loop.best_metric:.4f} ({best})"
        if plot:
            summary += f", loss curves {plot}"
        loop.console.print(summary, markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- assembly
def default_hooks(cfg: Any) -> list[Hook]:
    """The built-in hooks a config asks for, plus its ``train.hooks`` plugins, ``train.ema`` and
    ``train.tensorboard`` (shorthand for ``train.hooks: [{type: tensorboard}]``)."""
    tc = cfg.train
    hooks: list[Hook] = [
        ProgressHook(),
        MetricsFileHook(),
        FrozenBackboneHook(tc.freeze_backbone_epochs),
        LRScheduleHook(),
        NonFiniteLossHook(tc.loss_guard, tc.checkpoint_every_iters),
        LoggingHook(),
        EvalHook(),
        CheckpointHook(tc.checkpoint_interval, tc.checkpoint_every_iters),
        SummaryHook(),
    ]
    if tc.ema is not None:
        hooks.append(EMAHook(tc.ema))
    from detkit.engine.trackers import TensorBoardHook, TrackerHook

    if tc.tensorboard and not any(spec.type == "tensorboard" for spec in tc.hooks):
        hooks.append(TensorBoardHook())
    for i, spec in enumerate(tc.hooks):
        hook = spec.build()
        if not isinstance(hook, Hook):
            raise ConfigError(f"train.hooks[{i}]: hook '{spec.type}' is a {type(hook).__name__}, "
                              "not a detkit.interfaces.Hook")
        if isinstance(hook, TrackerHook):
            hook.field = f"train.hooks[{i}]"  # named when its run cannot be opened
        hooks.append(hook)
    return sort_hooks(hooks)


def sort_hooks(hooks: list[Hook]) -> list[Hook]:
    """By priority, stable (equal priorities keep their order)."""
    return sorted(hooks, key=lambda h: h.priority)
