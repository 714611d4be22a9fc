"""The training loop behind ``detkit train``.

One loop for CPU and GPU; AMP is a flag.  Each iteration, in order:
the trainer's ``train_step`` (zero-grad, forward, backward, step), the LR
schedule, the timer/throughput, and every ``log_interval`` steps a metrics
record.  At the end of each epoch: evaluation (every ``eval.interval``
epochs), ``last.pt`` (every ``checkpoint_interval`` epochs and at the end),
``best.pt`` when the validation mAP improved.  At the end of the run: the
loss-curve PNG.

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl``, ``last.pt``,
``best.pt``, ``losses.png``.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from detkit.config import Config
from detkit.engine.device import resolve_device
from detkit.engine.distributed import (
    DistInfo,
    average_gradients,
    barrier,
    broadcast_parameters,
    init_from_env,
    shutdown,
)
from detkit.engine.checkpoint import atomic_write_text, load_checkpoint, load_model_state, save_checkpoint
from detkit.engine.evaluate import evaluate, metrics_table
from detkit.engine.logging import LOSS_NAMES, MetricsWriter, Throughput, TrainDisplay, plot_losses
from detkit.engine.optim import build_optimizer, build_scheduler
from detkit.errors import CheckpointError, ConfigError, DetkitError
from detkit.registry import registry


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_dir_for(cfg: Config, config_path: Path | None, out_dir: Path | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    name = cfg.name or (config_path.stem if config_path else "run")
    try:
        return Path(cfg.train.out_dir.format(name=name))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"train.out_dir: {cfg.train.out_dir!r} may only use the placeholder {{name}} ({exc})"
        ) from None


def _trainer_extra_state(trainer: torch.nn.Module) -> Any:
    """A trainer's own state beyond the model and optimizer (its seeded generators), if it keeps any."""
    if type(trainer).get_extra_state is torch.nn.Module.get_extra_state:
        return None
    return trainer.get_extra_state()


def _warn_if_predict_resizes_differently(model: torch.nn.Module, cfg: Config, console: Console) -> None:
    """Training sizes come from data.transforms, `predict` sizes from the detector's own
    preprocessing: a model trained at one size and used at another loses accuracy silently."""
    pre = getattr(model, "preprocess", None)
    t = cfg.data.transforms
    if pre is None or t.fixed_size is not None or not hasattr(pre, "min_size"):
        return
    if (pre.min_size, getattr(pre, "max_size", None)) != (t.min_size, t.max_size):
        console.print(
            f"warning: data.transforms resizes to min_size {t.min_size} / max_size {t.max_size} but "
            f"`detkit predict` will use model.preprocess min_size {pre.min_size} / max_size "
            f"{getattr(pre, 'max_size', None)}; set them alike unless that is intended",
            markup=False, highlight=False, soft_wrap=True,
        )


def _backbone_only_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Trunk parameters: the extractor's, minus any it shares with the head (the RoI tail)."""
    head = {id(p) for p in model.head.parameters()} if hasattr(model, "head") else set()
    return [p for p in model.extractor.parameters() if id(p) not in head]


def _set_backbone_frozen(params: list[torch.nn.Parameter], trainable: dict[int, bool], frozen: bool) -> None:
    for p in params:
        p.requires_grad_(False if frozen else trainable[id(p)])


def train(
    cfg: Config,
    config_path: Path | None = None,
    resume: Path | None = None,
    out_dir: Path | None = None,
    console: Console | None = None,
) -> Path:
    """Train as ``cfg`` says; returns the run directory.

    Under ``torchrun`` (WORLD_SIZE > 1) every process runs this, each on its
    shard of the data; see :mod:`detkit.engine.distributed`.
    """
    tc = cfg.train
    device = resolve_device(tc.device)
    dist_info = init_from_env(device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    # Only rank 0 talks and writes; the other processes train quietly.
    console = console or Console(quiet=not dist_info.is_main)
    try:
        return _train(cfg, config_path, resume, out_dir, console, device, dist_info)
    finally:
        shutdown(dist_info)


def _train(
    cfg: Config,
    config_path: Path | None,
    resume: Path | None,
    out_dir: Path | None,
    console: Console,
    device: torch.device,
    dist_info: DistInfo,
) -> Path:
    from detkit.data.loader import build_dataset, build_loader

    tc = cfg.train
    main = dist_info.is_main
    seed_everything(tc.seed)
    run_dir = run_dir_for(cfg, config_path, out_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DetkitError(f"{run_dir}: cannot create the run directory ({exc.strerror or exc})") from None

    train_set = build_dataset(cfg.data, "train", seed=tc.seed)
    val_set = build_dataset(cfg.data, "val", seed=tc.seed) if cfg.data.val is not None and cfg.eval.interval else None
    classes = list(train_set.classes)
    if val_set is not None and list(val_set.classes) != classes:
        raise ConfigError(f"data.val: classes {list(val_set.classes)} differ from data.train's {classes}")
    if len(train_set) == 0:
        raise DetkitError("data.train: the training split has no images")

    model = registry("detector").build(cfg.model, num_classes=len(classes)).to(device)
    _warn_if_predict_resizes_differently(model, cfg, console)
    if dist_info.enabled:
        broadcast_parameters(model)
        average_gradients(model, dist_info.world_size)
    optimizer = build_optimizer(model, tc.optimizer)
    trainer = registry("trainer").build(tc.trainer, model=model, optimizer=optimizer)
    trainer.to(device)

    loaders: dict[int, Any] = {}

    def loader_for(epoch: int):
        """The train loader of this epoch's batch size (one per size; workers persist)."""
        frozen = epoch < tc.freeze_backbone_epochs
        batch_size = (tc.freeze_batch_size or cfg.data.batch_size) if frozen else cfg.data.batch_size
        if batch_size not in loaders:
            loaders[batch_size] = build_loader(
                train_set, batch_size=batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                seed=tc.seed, drop_last=len(train_set) >= batch_size * dist_info.world_size,
                num_replicas=dist_info.world_size, rank=dist_info.rank,
            )
        loader = loaders[batch_size]
        loader.sampler.set_epoch(epoch)  # shuffling and augmentation depend on (seed, epoch) only
        return loader

    def iters_in(epoch: int) -> int:
        n = len(loader_for(epoch))
        return min(n, tc.max_iters_per_epoch) if tc.max_iters_per_epoch else n

    epoch_iters = [iters_in(e) for e in range(tc.epochs)]
    total_steps = sum(epoch_iters)
    scheduler = build_scheduler(optimizer, tc.scheduler, epoch_iters)
    use_scaler = tc.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_epoch, step, best_map = 0, 0, -math.inf
    if resume is not None:
        ckpt = load_checkpoint(resume, map_location=device)
        if list(ckpt["classes"]) != classes:
            raise CheckpointError(f"{resume}: trained for classes {list(ckpt['classes'])}, this config has {classes}")
        load_model_state(model, ckpt["model"], str(resume))
        for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if ckpt.get(name) is not None:
                obj.load_state_dict(ckpt[name])
        start_epoch, step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
        if ckpt.get("trainer_state") is not None:
            trainer.set_extra_state(ckpt["trainer_state"])
        if ckpt.get("rng_state") is not None:
            torch.set_rng_state(ckpt["rng_state"].cpu())
        if ckpt.get("cuda_rng_state") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["cuda_rng_state"]])
        best_map = float(ckpt.get("best_map", -math.inf))
        console.print(f"resumed from {resume}: epoch {start_epoch}, step {step}", markup=False, highlight=False, soft_wrap=True)
        if start_epoch >= tc.epochs:
            console.print(f"nothing to do: the checkpoint already finished {start_epoch} epochs",
                          markup=False, highlight=False, soft_wrap=True)

    if main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    metrics = MetricsWriter(run_dir / "metrics.jsonl", tensorboard=tc.tensorboard) if main else None
    backbone_params = _backbone_only_params(model)
    trainable = {id(p): p.requires_grad for p in backbone_params}
    console.print(
        f"training {cfg.model.type} ({cfg.model.params.model_dump().get('backbone', {}).get('type', '?')}) "
        f"on {len(train_set)} images, {len(classes)} classes, device {device}, "
        f"{tc.epochs} epochs x {epoch_iters[-1]} iterations"
        + (f" x {dist_info.world_size} processes" if dist_info.enabled else "") + f" -> {run_dir}",
        markup=False, highlight=False, soft_wrap=True,
    )

    def checkpoint(path: Path, epoch_done: int, result: dict[str, Any] | None) -> None:
        if not main:
            return
        save_checkpoint(
            path, model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), epoch=epoch_done, step=step, best_map=best_map,
            config=cfg.to_dict(), classes=classes, metrics=result or {},
            # Target sampling draws from the global generators: restoring them
            # makes a resumed run continue exactly as an uninterrupted one.
            rng_state=torch.get_rng_state(),
            trainer_state=_trainer_extra_state(trainer),
            cuda_rng_state=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        )

    t_start = time.perf_counter()
    last_result: dict[str, Any] | None = None
    val_loader = None
    try:
        with TrainDisplay(console, total_steps, sum(epoch_iters[:start_epoch])) as display:
            for epoch in range(start_epoch, tc.epochs):
                frozen = epoch < tc.freeze_backbone_epochs
                _set_backbone_frozen(backbone_params, trainable, frozen)
                model.train()
                throughput, window = Throughput(), []
                for i, batch in enumerate(loader_for(epoch)):
                    if i >= epoch_iters[epoch]:
                        break
                    batch = batch.to(device, non_blocking=True)
                    losses = trainer.train_step(
                        batch.images, batch.boxes, batch.labels, scale=batch.scales,
                        image_sizes=batch.image_sizes, fp16=tc.amp, scaler=scaler if use_scaler else None,
                    )
                    scheduler.step()
                    step += 1
                    throughput.add(len(batch) * dist_info.world_size)
                    window.append(torch.stack([l.detach().float() for l in losses]))
                    display.advance(epoch, tc.epochs)
                    if step % tc.log_interval == 0 or i + 1 == epoch_iters[epoch]:
                        # One host sync per logging window, not per step.
                        values = torch.stack(window).mean(0).tolist()
                        window = []
                        if not all(math.isfinite(v) for v in values):
                            raise DetkitError(
                                f"loss became {values[-1]} at step {step}: lower train.optimizer.lr, "
                                "set train.trainer.grad_clip, or check the data (see `detkit data stats`)"
                            )
                        record = {"type": "train", "epoch": epoch, "step": step,
                                  **dict(zip(LOSS_NAMES, values)),
                                  "lr": optimizer.param_groups[0]["lr"], "images_per_s": throughput.rate(),
                                  "backbone_frozen": frozen}
                        if metrics is not None:
                            metrics.write(record)
                        display.log(record)
                epoch_done = epoch + 1
                result = None
                if main and val_set is not None and (epoch_done % cfg.eval.interval == 0 or epoch_done == tc.epochs):
                    if val_loader is None:  # built once: its workers persist between evaluations
                        val_loader = build_loader(val_set, batch_size=cfg.data.batch_size, shuffle=False,
                                                  num_workers=cfg.data.num_workers, seed=tc.seed)
                    result = evaluate(model, val_loader, classes, cfg.eval, device)
                    last_result = result
                    # NaN (a class without ground truth) is not JSON: write null.
                    aps = {k: (None if v is None or math.isnan(v) else v) for k, v in result.get("AP", {}).items()}
                    metrics.write({"type": "eval", "epoch": epoch, "step": step, "mAP": result["mAP"], "AP": aps})
                    display.message(f"epoch {epoch_done}: val mAP@{cfg.eval.iou_thresh} {result['mAP']:.4f}")
                    if result["mAP"] > best_map:
                        best_map = result["mAP"]
                        checkpoint(run_dir / "best.pt", epoch_done, result)
                if epoch_done % tc.checkpoint_interval == 0 or epoch_done == tc.epochs:
                    checkpoint(run_dir / "last.pt", epoch_done, result)
                barrier(dist_info)  # the others wait while rank 0 evaluates and writes
    except KeyboardInterrupt:
        if (run_dir / "last.pt").exists():
            console.print(f"interrupted at step {step}; {run_dir / 'last.pt'} holds the last finished epoch "
                          f"(continue with --resume {run_dir / 'last.pt'})", markup=False, highlight=False,
                          soft_wrap=True)
        raise
    finally:
        if metrics is not None:
            metrics.close()
    if not main:
        return run_dir

    plot = plot_losses(run_dir / "metrics.jsonl", run_dir / "losses.png")
    minutes = (time.perf_counter() - t_start) / 60
    if last_result is not None:
        console.print(metrics_table(last_result, title=f"val AP ({len(val_set)} images)"))
    summary = f"done in {minutes:.1f} min: {run_dir / 'last.pt'}"
    if val_set is not None and best_map > -math.inf:
        summary += f", best val mAP@{cfg.eval.iou_thresh} {best_map:.4f} ({run_dir / 'best.pt'})"
    if plot:
        summary += f", loss curves {plot}"
    console.print(summary, markup=False, highlight=False, soft_wrap=True)
    return run_dir
