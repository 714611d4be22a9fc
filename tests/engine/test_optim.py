import warnings

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from detkit.sections import TrainConfig
from detkit.engine.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from detkit.registry import registry


def schedule(spec, epoch_steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return build_scheduler(opt, spec, epoch_steps)


def test_step_schedule_with_warmup():
    s = schedule({"type": "step", "milestones": [2, 3], "gamma": 0.1, "warmup_iters": 4, "warmup_factor": 0.2},
                 [10, 10, 10, 10])
    f = [lr_factor(s, it) for it in (0, 2, 4, 19, 20, 30)]
    assert f == pytest.approx([0.2, 0.6, 1.0, 1.0, 0.1, 0.01])


def test_cosine_goes_from_one_to_floor():
    s = schedule({"type": "cosine", "min_lr_ratio": 0.1}, [10] * 10)
    assert lr_factor(s, 0) == pytest.approx(1.0)
    assert lr_factor(s, 50) == pytest.approx(0.55)
    assert lr_factor(s, 100) == pytest.approx(0.1)


def test_constant_with_warmup_and_the_scheduler_steps_the_optimizer():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    s = build_scheduler(opt, {"type": "constant", "warmup_iters": 2, "warmup_factor": 0.5}, [4])
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs == pytest.approx([0.25, 0.375, 0.5, 0.5])
    # Nothing of the schedule's closure goes into its state (weights_only checkpoints).
    assert s.state_dict()["lr_lambdas"] == [None]


def test_biases_and_norms_do_not_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 1e-4)
    assert {tuple(p.shape) for p in decay["params"]} == {(4, 3, 3, 3), (2, 4)}
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, {"type": "adamw", "lr": 0.01, "weight_decay": 0.5})
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.5
    sgd = build_optimizer(model, {"type": "sgd", "lr": 0.1, "nesterov": True})
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert isinstance(build_optimizer(model, "adam"), torch.optim.Adam)


def test_shared_parameters_are_listed_once():
    shared = torch.nn.Linear(2, 2)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared)})
    groups = param_groups(model, 0.0)
    assert sum(len(g["params"]) for g in groups) == 2


def test_step_milestones_count_epochs_of_different_lengths():
    # A frozen phase of 2 epochs x 4 iterations, then 2 epochs x 2: milestone at epoch 3.
    s = schedule({"type": "step", "milestones": [3], "gamma": 0.1}, [4, 4, 2, 2])
    assert lr_factor(s, 9) == pytest.approx(1.0)  # still epoch 2
    assert lr_factor(s, 10) == pytest.approx(0.1)  # first iteration of epoch 3


def test_config_validates_each_type_with_its_own_params():
    tc = TrainConfig.model_validate({"optimizer": {"type": "adamw", "lr": 0.002, "weight_decay": 1e-4},
                                     "scheduler": {"type": "cosine", "warmup_iters": 50}})
    assert tc.optimizer.to_dict() == {"type": "adamw", "lr": 0.002, "betas": [0.9, 0.999], "eps": 1e-8,
                                      "weight_decay": 1e-4}
    assert TrainConfig().optimizer.type == "sgd" and TrainConfig().scheduler.type == "step"
    with pytest.raises(Exception, match=r"optimizer\n\s+lr: Input should be greater than 0"):
        TrainConfig.model_validate({"optimizer": {"type": "sgd", "lr": -1}})
    with pytest.raises(Exception, match=r"unknown optimizer 'adamm'.*'adam'"):
        TrainConfig.model_validate({"optimizer": {"type": "adamm"}})


def test_fields_of_the_old_shared_model_are_dropped_with_a_warning():
    with pytest.warns(UserWarning, match=r"train.optimizer: momentum does not apply to 'adam' and is ignored"):
        tc = TrainConfig.model_validate({"optimizer": {"type": "adam", "momentum": 0.9, "lr": 0.01}})
    assert "momentum" not in tc.optimizer.to_dict()
    with pytest.warns(UserWarning, match=r"train.scheduler: gamma, milestones does not apply to 'cosine'"):
        TrainConfig.model_validate({"scheduler": {"type": "cosine", "milestones": [3], "gamma": 0.1}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig.model_validate({"optimizer": {"type": "sgd", "momentum": 0.5}})  # sgd takes it: no warning


def test_a_plugin_optimizer_from_the_registry(clean_registry):
    class LionLike(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lr: float = 1e-4

    def signsgd(params, *, model):
        return torch.optim.SGD(model.parameters(), lr=params.lr)

    signsgd.Params = LionLike
    registry("optimizer").register("signsgd")(signsgd)
    tc = TrainConfig.model_validate({"optimizer": {"type": "signsgd", "lr": 0.5}})
    opt = build_optimizer(torch.nn.Linear(2, 1), tc.optimizer)
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-3])
def test_learning_rates_must_be_finite_and_positive(kind, lr):
    message = "finite number" if lr != lr or abs(lr) == float("inf") else "greater than 0"
    with pytest.raises(Exception, match=rf"optimizer\n\s+lr: Input should be (a )?{message}"):
        TrainConfig.model_validate({"optimizer": {"type": kind, "lr": lr}})
    assert TrainConfig.model_validate({"optimizer": {"type": kind, "lr": 1e-6}}).optimizer.to_dict()["lr"] == 1e-6
