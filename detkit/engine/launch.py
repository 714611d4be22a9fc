"""Starting a training run: :func:`train`, behind ``detkit train`` and ``detkit.api``.

Picks the device and, under ``torchrun``, the process group; resolves and checks
the run directory (refused when it already holds checkpoints, unless resuming or
``overwrite``), builds :class:`detkit.engine.train.TrainLoop` before anything is
written, takes the run directory's lock, writes ``config.yaml`` and
``data_summary.txt``, says what it trains, and runs the loop.  A start that fails
before the first step removes the directory it created.  ``detkit.engine.train``
re-exports :func:`train`.
"""

from __future__ import annotations

import random
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from rich.console import Console

from detkit.config import Config, check_requirements
from detkit.data.paths import absolute_data_paths
from detkit.engine.checkpoint import atomic_write_text
from detkit.engine.device import resolve_device
from detkit.engine.distributed import (DistInfo, agree_on_setup_errors, init_from_env, peer_failures_exit_quietly,
                                      shutdown)
from detkit.engine.run_dir import (check_run_dir, clear_run_dir, first_missing_dir, prepare_run_dir, remove_empty_dirs,
                                   run_dir_for, say as _say)

if TYPE_CHECKING:
    from detkit.engine.train import TrainLoop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(
    cfg: Config,
    config_path: Path | None = None,
    resume: Path | None = None,
    out_dir: Path | None = None,
    console: Console | None = None,
    overwrite: bool = False,
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
    with peer_failures_exit_quietly(dist_info):
        run_dir = _train(cfg, config_path, resume, out_dir, console, device, dist_info, overwrite)
    # Only after a finished run: destroying the group wakes the other ranks' pending
    # collectives, and after an error torchrun would then stop this process before it
    # says what went wrong; the CLI releases the group once the error is printed.
    shutdown(dist_info)
    return run_dir


def _train(
    cfg: Config,
    config_path: Path | None,
    resume: Path | None,
    out_dir: Path | None,
    console: Console,
    device: torch.device,
    dist_info: DistInfo,
    overwrite: bool = False,
) -> Path:
    from detkit.engine.train import TrainLoop  # when called: detkit.engine.train re-exports this module's train

    seed_everything(cfg.train.seed)
    # The stored config (config.yaml, checkpoints) holds absolute data paths, so
    # eval, predict and --resume work from any directory.
    cfg = absolute_data_paths(cfg)
    run_dir = run_dir_for(cfg, config_path, out_dir, resume)
    # Data, model and checkpoint are checked before anything is written: a failed
    # start leaves no empty run directory behind.  Under torchrun one rank reports.
    with agree_on_setup_errors(dist_info):
        # A package a tracker hook needs is looked for before anything is built or written.
        check_requirements(cfg, str(config_path) if config_path is not None else "<config>")
        if dist_info.is_main:
            check_run_dir(run_dir, resume, overwrite)
        loop = TrainLoop(cfg, run_dir, console, device, dist_info)
        if resume is not None:
            loop.resume(resume)
    # A start that fails before the first step (in a hook's before_train: a tracker that cannot
    # open its run) takes away the directory it created: emptied under the lock, removed after.
    created = first_missing_dir(run_dir) if dist_info.is_main else None
    owned = False

    def clear_if_unstarted(exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None and created is not None and not loop.training_started:
            clear_run_dir(run_dir)
        return False

    try:
        with ExitStack() as held:
            if dist_info.is_main:  # only rank 0 writes: on other nodes the directory need not exist
                held.enter_context(prepare_run_dir(run_dir, overwrite, console))  # released however the run ends
                owned = True
                held.push(clear_if_unstarted)  # runs before the lock is released
            return _start(loop, cfg, run_dir, console, device, dist_info)
    except BaseException:
        if owned and created is not None and not loop.training_started:
            remove_empty_dirs(run_dir, created)
        raise


def _start(loop: "TrainLoop", cfg: Config, run_dir: Path, console: Console, device: torch.device,
           dist_info: DistInfo) -> Path:
    """Write the run's config, say what it trains, and train."""
    if dist_info.is_main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tc = cfg.train
    backbone = cfg.model.params.model_dump().get("backbone", {})
    _say(console,
         f"training {cfg.model.type} ({backbone.get('type', '?') if isinstance(backbone, dict) else '?'}) "
         f"on {len(loop.train_set)} images, {len(loop.classes)} classes, device {device}, "
         f"{tc.epochs} epochs x {loop.epoch_steps[-1]} iterations"
         + (f" (x {tc.accumulate} accumulated batches)" if tc.accumulate > 1 else "")
         + (f" x {dist_info.world_size} processes" if dist_info.enabled else "")
         + (f" ({pad} repeated each epoch for equal shares)" if (pad := -len(loop.train_set) % dist_info.world_size)
            else "") + f" -> {run_dir}")
    boxes = box_summary(loop)
    for line in boxes:
        _say(console, line)
    if dist_info.is_main and boxes:  # kept with the run: what the readers did to the ground truth
        atomic_write_text(run_dir / DATA_SUMMARY, "\n".join(boxes) + "\n")
    return loop.run()


DATA_SUMMARY = "data_summary.txt"


def box_summary(loop: TrainLoop) -> list[str]:
    """One line per split whose reader checked its boxes against the images (clipped, dropped)."""
    from detkit.data.box_report import find_box_report

    lines = []
    for split, dataset in (("train", loop.train_set), ("val", loop.val_set)):
        report = find_box_report(dataset)
        if report is not None:
            lines.append(report.line(f"data.{split}"))
    return lines
