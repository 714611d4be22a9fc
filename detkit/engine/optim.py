"""Optimizers and per-iteration learning-rate schedules: the built-in ``optimizer`` and
``lr_scheduler`` plugins.

Both are plugin kinds like any component (entry-point groups ``detkit.optimizer``
and ``detkit.lr_scheduler``; config ``train.optimizer`` / ``train.scheduler`` as
``{type: name, ...params}``).

- An **optimizer** factory is called as ``factory(params, model=detector)``
  (``params``: its validated ``Params``) and returns a
  ``torch.optim.Optimizer``.  The built-ins ``sgd``, ``adam`` and ``adamw``
  put weights in a group with ``weight_decay`` and biases/normalisation
  parameters in one without.
- An **lr_scheduler** factory is called as ``factory(params, optimizer=...,
  epoch_steps=...)``, ``epoch_steps`` being the optimizer steps in each epoch
  (epochs may differ in length, as in a frozen-backbone phase with its own
  batch size), and returns a
  ``torch.optim.lr_scheduler.LRScheduler`` that the engine steps once per
  optimizer step.  The built-ins ``step``, ``cosine`` and ``constant`` share a
  linear warm-up (``warmup_iters``, ``warmup_factor``).
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class _Strict(BaseModel):
    # No inf/NaN in any rate or factor: `lr: .inf` passes `gt=0` and would train on
    # NaN weights from the first step.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ------------------------------------------------------------------ optimizers
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


class SGDParams(_Strict):
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, description="on weights only, not on biases and norms")


class AdamParams(_Strict):
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(5e-4, ge=0, description="on weights only, not on biases and norms")


def sgd(params: SGDParams, *, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (Faster R-CNN's optimizer)."""
    return torch.optim.SGD(param_groups(model, params.weight_decay), lr=params.lr, momentum=params.momentum,
                           nesterov=params.nesterov)


def adam(params: AdamParams, *, model: nn.Module) -> torch.optim.Optimizer:
    """Adam; its weight decay is an L2 term in the gradient."""
    return torch.optim.Adam(param_groups(model, params.weight_decay), lr=params.lr, betas=params.betas,
                            eps=params.eps)


def adamw(params: AdamParams, *, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW: decoupled weight decay (Loshchilov & Hutter)."""
    return torch.optim.AdamW(param_groups(model, params.weight_decay), lr=params.lr, betas=params.betas,
                             eps=params.eps)


sgd.Params = SGDParams  # type: ignore[attr-defined]
adam.Params = AdamParams  # type: ignore[attr-defined]
adamw.Params = AdamParams  # type: ignore[attr-defined]


def build_optimizer(model: nn.Module, spec: Any) -> torch.optim.Optimizer:
    """The ``train.optimizer`` component for ``model``."""
    from detkit.registry import registry

    optimizer = registry("optimizer").build(spec, model=model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer plugin '{getattr(spec, 'type', spec)}' returned a {type(optimizer).__name__}, "
                        "not a torch.optim.Optimizer")
    return optimizer


# ----------------------------------------------------------- LR schedules
class _Warmup(_Strict):
    warmup_iters: int = Field(0, ge=0, description="steps of linear warm-up from warmup_factor x lr")
    warmup_factor: float = Field(0.001, gt=0, le=1)


class StepParams(_Warmup):
    milestones: list[int] = Field(default_factory=list, description="epochs at which lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0)


class CosineParams(_Warmup):
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a share of lr")


class ConstantParams(_Warmup):
    pass


def warmup_multiplier(it: int, warmup_iters: int, factor: float) -> float:
    """Linear warm-up from ``factor`` to 1 over the first ``warmup_iters`` steps."""
    if it >= warmup_iters:
        return 1.0
    alpha = it / warmup_iters
    return factor * (1 - alpha) + alpha


def _lambda_scheduler(
    optimizer: torch.optim.Optimizer, curve: Callable[[int], float], warmup: _Warmup
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_iters, warmup_factor = warmup.warmup_iters, warmup.warmup_factor

    # A plain function (not a callable object): LambdaLR's state_dict then stores
    # nothing of it, and checkpoints stay loadable with weights_only=True.
    def factor(it: int) -> float:
        return curve(it) * warmup_multiplier(it, warmup_iters, warmup_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _starts(epoch_steps: Sequence[int]) -> list[int]:
    return [sum(epoch_steps[:e]) for e in range(len(epoch_steps))]


def step_schedule(
    params: StepParams, *, optimizer: torch.optim.Optimizer, epoch_steps: Sequence[int]
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr x gamma at each milestone epoch (counted in epochs, whatever their lengths)."""
    starts = _starts(epoch_steps)
    milestones, gamma = list(params.milestones), params.gamma

    def curve(it: int) -> float:
        epoch = bisect.bisect_right(starts, it) - 1
        return gamma ** sum(epoch >= m for m in milestones)

    return _lambda_scheduler(optimizer, curve, params)


def cosine_schedule(
    params: CosineParams, *, optimizer: torch.optim.Optimizer, epoch_steps: Sequence[int]
) -> torch.optim.lr_scheduler.LambdaLR:
    """Half a cosine from lr to ``min_lr_ratio`` x lr over the whole run."""
    total = max(sum(epoch_steps), 1)
    floor = params.min_lr_ratio

    def curve(it: int) -> float:
        progress = min(it / total, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return _lambda_scheduler(optimizer, curve, params)


def constant_schedule(
    params: ConstantParams, *, optimizer: torch.optim.Optimizer, epoch_steps: Sequence[int]
) -> torch.optim.lr_scheduler.LambdaLR:
    """The configured lr throughout (after the warm-up)."""
    return _lambda_scheduler(optimizer, lambda it: 1.0, params)


step_schedule.Params = StepParams  # type: ignore[attr-defined]
cosine_schedule.Params = CosineParams  # type: ignore[attr-defined]
constant_schedule.Params = ConstantParams  # type: ignore[attr-defined]


def build_scheduler(optimizer: torch.optim.Optimizer, spec: Any, epoch_steps: Sequence[int]) -> Any:
    """The ``train.scheduler`` component, stepped once per optimizer step."""
    from detkit.registry import registry

    return registry("lr_scheduler").build(spec, optimizer=optimizer, epoch_steps=list(epoch_steps))


def lr_factor(scheduler: Any, it: int) -> float:
    """The multiplier of the base learning rate a LambdaLR scheduler gives at step ``it``."""
    return scheduler.lr_lambdas[0](it)
