import math

import pytest
import torch

from detkit.engine.config import OptimizerConfig, SchedulerConfig
from detkit.engine.optim import build_optimizer, lr_factor, param_groups


def test_step_schedule_with_warmup():
    cfg = SchedulerConfig(type="step", milestones=[2, 3], gamma=0.1, warmup_iters=4, warmup_factor=0.2)
    f = [lr_factor(cfg, it, [0, 10, 20, 30], 40) for it in (0, 2, 4, 19, 20, 30)]
    assert f == pytest.approx([0.2, 0.6, 1.0, 1.0, 0.1, 0.01])


def test_cosine_goes_from_one_to_floor():
    cfg = SchedulerConfig(type="cosine", min_lr_ratio=0.1)
    assert lr_factor(cfg, 0, list(range(0, 100, 10)), 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, list(range(0, 100, 10)), 100) == pytest.approx(0.55)
    assert lr_factor(cfg, 100, list(range(0, 100, 10)), 100) == pytest.approx(0.1)


def test_biases_and_norms_do_not_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 1e-4)
    assert {tuple(p.shape) for p in decay["params"]} == {(4, 3, 3, 3), (2, 4)}
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, OptimizerConfig(type="adamw", lr=0.01, weight_decay=0.5))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.5


def test_shared_parameters_are_listed_once():
    shared = torch.nn.Linear(2, 2)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared)})
    groups = param_groups(model, 0.0)
    assert sum(len(g["params"]) for g in groups) == 2


def test_step_milestones_count_epochs_of_different_lengths():
    # A frozen phase of 2 epochs x 4 iterations, then 2 epochs x 2: milestone at epoch 3.
    cfg = SchedulerConfig(type="step", milestones=[3], gamma=0.1)
    starts = [0, 4, 8, 10]
    assert lr_factor(cfg, 9, starts, 12) == pytest.approx(1.0)  # still epoch 2
    assert lr_factor(cfg, 10, starts, 12) == pytest.approx(0.1)  # first iteration of epoch 3
