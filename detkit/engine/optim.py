"""Optimizers and per-iteration learning-rate schedules from the config."""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch
from torch import nn

from detkit.engine.config import OptimizerConfig, SchedulerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights decay; biases and normalisation parameters do not (they only shift/scale)."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # a module shared by two parents (the RoI tail) appears twice
            continue
        seen.add(id(p))
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.type == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.type == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(cfg: SchedulerConfig, it: int, epoch_starts: Sequence[int], total_iters: int) -> float:
    """Multiplier of the base learning rate at iteration ``it`` (0-based).

    ``epoch_starts[e]`` is the first iteration of epoch ``e``: epochs may have
    different lengths (a frozen-backbone phase with its own batch size).
    """
    if cfg.type == "step":
        epoch = bisect.bisect_right(epoch_starts, it) - 1
        factor = cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    elif cfg.type == "cosine":
        progress = min(it / max(total_iters, 1), 1.0)
        factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, epoch_iters: Sequence[int]
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepped once per iteration; ``epoch_iters`` are the epochs' lengths."""
    starts = [sum(epoch_iters[:e]) for e in range(len(epoch_iters))]
    total = sum(epoch_iters)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it, starts, total))
