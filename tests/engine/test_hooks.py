"""The hook-based training loop: order, plugin hooks, iteration checkpoints, EMA, accumulation, loss guard."""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from torch import nn

from detkit.config import load_config
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.distributed import DistInfo
from detkit.sections import EMAConfig, LossGuardConfig
from detkit.engine.hooks import EMAHook
from detkit.data.loader import build_dataset
from detkit.engine.train import TrainLoop, train
from detkit.errors import ConfigError, DetkitError
from detkit.interfaces import Detector, Hook
from detkit.registry import registry

# ------------------------------------------------------------ toy plugins
EVENTS: list[tuple] = []


class Recorder(Hook):
    """Records every call with what the loop shows at that point."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tag: str = "r"

    def __init__(self, params: "Recorder.Params | None" = None):
        self.tag = (params if params is not None else self.Params()).tag

    def before_train(self):
        EVENTS.append(("before_train", self.loop.step))

    def before_epoch(self):
        EVENTS.append(("before_epoch", self.loop.epoch))

    def before_step(self):
        EVENTS.append(("before_step", self.loop.step))

    def after_step(self):
        EVENTS.append(("after_step", self.loop.step, tuple(self.loop.losses)))

    def after_epoch(self):
        EVENTS.append(("after_epoch", self.loop.epoch, self.loop.eval_result is not None))

    def after_train(self):
        EVENTS.append(("after_train", self.loop.completed))


class StopAt(Hook):
    """Asks the loop to stop after step ``step`` (after the checkpoint hook has run)."""

    priority = 70

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        step: int

    def __init__(self, params: "StopAt.Params"):
        self.step = params.step

    def after_step(self):
        if self.loop.step == self.step:
            self.loop.request_stop("test")


class ToyDetector(Detector):
    """A linear model of the mean colour: enough for the loop, nothing Faster R-CNN.

    Its one training loss ``mse`` is the squared error between the prediction
    and the number of boxes (a per-image mean), plus ``offset``.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        offset: float = 0.0

    def __init__(self, params: "ToyDetector.Params | None" = None, *, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.offset = (params if params is not None else self.Params()).offset
        self.lin = nn.Linear(3, 1)

    def forward(self, images, targets=None):
        x = torch.stack([(im.float() / 255 if im.dtype == torch.uint8 else im.float()).mean((1, 2)) for im in images])
        pred = self.lin(x).squeeze(1)
        if not self.training:
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                    for _ in images]
        count = torch.tensor([float(len(t["boxes"])) for t in targets], device=pred.device)
        return {"mse": ((pred - count) ** 2).mean() + self.offset}

    def detection_settings(self, score_thresh=None, nms_iou=None, max_detections=None):
        return nullcontext()


@pytest.fixture
def toys(clean_registry):
    EVENTS.clear()
    registry("hook").register("recorder")(Recorder)
    registry("hook").register("stop_at")(StopAt)
    registry("detector").register("toy_detector")(ToyDetector)
    yield


TOY = """
model: {type: toy_detector}
data:
  train: {type: synthetic, num_images: 8, image_size: [64, 64], object_size: [16, 32], split: train}
  batch_size: 4
train:
  epochs: 1
  optimizer: {type: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0}
  scheduler: {type: constant}
  log_interval: 1
  device: cpu
eval: {interval: 0}
"""


def toy_config(tmp_path: Path, *overrides: str):
    path = tmp_path / "toy.yaml"
    path.write_text(TOY)
    return load_config(path, list(overrides))


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


# ------------------------------------------------------------------- order
def test_builtin_hooks_run_in_the_documented_order(toys, tmp_path):
    cfg = toy_config(tmp_path, "train.ema={decay: 0.9}", "train.hooks=[{type: recorder}]")
    loop = TrainLoop(cfg, tmp_path / "run", Console(quiet=True), torch.device("cpu"), DistInfo())
    assert [type(h).__name__ for h in loop.hooks] == [
        "ProgressHook", "MetricsFileHook", "FrozenBackboneHook", "LRScheduleHook", "EMAHook",
        "NonFiniteLossHook", "LoggingHook", "EvalHook", "Recorder", "CheckpointHook", "SummaryHook",
    ]
    # Built from the config's sections: train.ema's decay, the rest from EMAConfig's defaults.
    ema = next(h for h in loop.hooks if isinstance(h, EMAHook))
    assert (ema.decay, ema.tau) == (0.9, EMAConfig().tau)


def test_plugin_hook_from_config_sees_each_event_in_order(toys, tmp_path):
    cfg = toy_config(tmp_path, "train.epochs=2", "train.hooks=[{type: recorder, tag: x}]")
    run_dir = train(cfg, out_dir=tmp_path / "run")
    names = ("mse", "total")
    assert EVENTS == [
        ("before_train", 0),
        ("before_epoch", 0),
        ("before_step", 0), ("after_step", 1, names), ("before_step", 1), ("after_step", 2, names),
        ("after_epoch", 0, False),
        ("before_epoch", 1),
        ("before_step", 2), ("after_step", 3, names), ("before_step", 3), ("after_step", 4, names),
        ("after_epoch", 1, False),
        ("after_train", True),
    ]
    # The loss names come from the detector's dict, not from a fixed list.
    recs = records(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all({"mse", "total"} <= set(r) and "rpn_loc" not in r for r in recs)
    assert (run_dir / "losses.png").exists()


def test_plugin_hook_params_are_validated_at_load_time(toys, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.hooks\[0\]\.tga"):
        toy_config(tmp_path, "train.hooks=[{type: recorder, tga: x}]")
    with pytest.raises(ConfigError, match=r"train\.hooks\[0\]\.type: unknown hook 'recordr'.*'recorder'"):
        toy_config(tmp_path, "train.hooks=[{type: recordr}]")


# ------------------------------------------------------------ checkpoints
def test_checkpoint_every_iters_resumes_mid_epoch_exactly(toys, tmp_path):
    common = ["train.epochs=2", "data.batch_size=2", "train.checkpoint_every_iters=3", "train.ema={decay: 0.6, tau: 0}"]
    straight = train(toy_config(tmp_path, *common), out_dir=tmp_path / "straight")
    # Stopped after step 5 of 8: epoch 1, one step into it; step 3 was saved by iteration, 5 on stop.
    split = train(toy_config(tmp_path, *common, "train.hooks=[{type: recorder}, {type: stop_at, step: 5}]"),
                  out_dir=tmp_path / "split")
    saves = [e for e in EVENTS if e[0] == "after_train"]
    assert saves == [("after_train", False)]
    stopped = load_checkpoint(split / "last.pt")
    assert (stopped["epoch"], stopped["epoch_step"], stopped["step"]) == (1, 1, 5)
    train(toy_config(tmp_path, *common), out_dir=split, resume=split / "last.pt")
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert (b["epoch"], b["step"]) == (2, 8)
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key
    for key in a["hooks"]["ema"]["weights"]:
        assert torch.allclose(a["hooks"]["ema"]["weights"][key], b["hooks"]["ema"]["weights"][key], atol=1e-6)
    assert [r["step"] for r in records(split)] == list(range(1, 9))
    assert [r["total"] for r in records(split)] == pytest.approx([r["total"] for r in records(straight)], rel=1e-6)


def test_iteration_checkpoints_are_written_between_epochs(toys, tmp_path, monkeypatch):
    seen = []
    import detkit.engine.train as train_mod

    real = train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint", lambda path, **kw: (seen.append((Path(path).name, kw["step"], kw["epoch"], kw["epoch_step"])), real(path, **kw))[1])
    train(toy_config(tmp_path, "data.batch_size=2", "train.checkpoint_every_iters=1"), out_dir=tmp_path / "run")
    # 4 steps in one epoch: steps 1-3 by iteration, step 4 with the epoch's end.
    assert seen == [("last.pt", 1, 0, 1), ("last.pt", 2, 0, 2), ("last.pt", 3, 0, 3), ("last.pt", 4, 1, 0)]


# --------------------------------------------------------------------- EMA
def test_ema_hook_averages_and_swaps_weights():
    model = nn.Linear(2, 1)
    hook = EMAHook(EMAConfig(decay=0.75, tau=0))
    hook.loop = SimpleNamespace(model=model)
    hook.before_train()
    old = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    new = model.weight.detach().clone()
    hook.after_step()
    expected = 0.75 * old + 0.25 * new
    assert torch.allclose(hook.shadow["weight"], expected)
    with hook.eval_weights():
        assert torch.allclose(model.weight, expected)
        state = hook.state_dict()  # what a checkpoint saves while the average is in the model
        assert state["in_model"] == "ema" and torch.equal(state["weights"]["weight"], new)
    assert torch.equal(model.weight, new)
    # Warm-up: the first update with tau keeps little of the initial weights.
    warm = EMAHook(EMAConfig(decay=0.9999, tau=2000))
    warm.updates = 0
    assert warm.current_decay() == 0.0 and EMAHook(EMAConfig(decay=0.5, tau=0)).current_decay() == 0.5


def test_evaluation_and_checkpoints_use_the_ema_weights(toys, tmp_path, monkeypatch):
    import detkit.engine.hooks as hooks_mod

    evaluated = []

    def fake_evaluate(model, loader, classes, cfg, device, **kw):
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"mAP": 0.5, "AP": {}}

    monkeypatch.setattr(hooks_mod, "evaluate", fake_evaluate)
    val = "data.val={type: synthetic, num_images: 2, image_size: [64, 64], object_size: [16, 32], split: val}"
    run = train(toy_config(tmp_path, val, "eval.interval=1", "train.ema={decay: 0.5, tau: 0}"), out_dir=tmp_path / "run")
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    trained = last["hooks"]["ema"]["weights"]
    assert len(evaluated) == 1
    for key in trained:
        assert torch.equal(evaluated[0][key], last["model"][key]) and torch.equal(best["model"][key], last["model"][key])
    assert not torch.equal(last["model"]["lin.weight"], trained["lin.weight"]), "EMA weights equal the trained ones"


# ------------------------------------------------------------ accumulation
def test_accumulating_two_batches_of_two_equals_one_batch_of_four(toys, tmp_path):
    big = train(toy_config(tmp_path, "train.epochs=2"), out_dir=tmp_path / "big")
    acc = train(toy_config(tmp_path, "train.epochs=2", "data.batch_size=2", "train.accumulate=2"), out_dir=tmp_path / "acc")
    a, b = load_checkpoint(big / "last.pt"), load_checkpoint(acc / "last.pt")
    assert a["step"] == b["step"] == 4  # optimizer steps, not micro-batches
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key
    assert [r["total"] for r in records(acc)] == pytest.approx([r["total"] for r in records(big)], rel=1e-5)
    one = train(toy_config(tmp_path, "train.epochs=2", "data.batch_size=2"), out_dir=tmp_path / "one")
    assert not torch.allclose(load_checkpoint(one / "last.pt")["model"]["lin.weight"], a["model"]["lin.weight"])


class CountingWrapper(nn.Module):
    """Stands in for DistributedDataParallel: forwards, and counts ``no_sync`` entries."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.forwards = self.no_syncs = 0
        self.in_no_sync = False
        self.synced_backwards = 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        if not self.in_no_sync:
            self.synced_backwards += 1
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self):
        self.no_syncs += 1
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False


def test_accumulation_skips_the_gradient_sync_on_all_but_the_last_micro_batch(toys, tmp_path):
    cfg = toy_config(tmp_path, "data.batch_size=1", "train.accumulate=4")
    (tmp_path / "run").mkdir()
    loop = TrainLoop(cfg, tmp_path / "run", Console(quiet=True), torch.device("cpu"), DistInfo())
    wrapper = CountingWrapper(loop.model)
    loop.trainer.module = wrapper
    loop.run()
    assert loop.step == 2 and wrapper.forwards == 8  # 8 images, batch 1, 4 per step
    assert wrapper.no_syncs == 6 and wrapper.synced_backwards == 2


def test_an_epoch_that_does_not_divide_steps_with_what_is_left(toys, tmp_path):
    # 8 images / batch 2 = 4 micro-batches; accumulate 3 -> steps of 3 and 1.
    run = train(toy_config(tmp_path, "data.batch_size=2", "train.accumulate=3"), out_dir=tmp_path / "run")
    assert load_checkpoint(run / "last.pt")["step"] == 2


# -------------------------------------------------------------- loss guard
def test_a_nan_loss_stops_with_one_line(toys, tmp_path):
    with pytest.raises(DetkitError, match=r"^loss became nan \(mse, total\) at step 1: lower train.optimizer.lr"):
        train(toy_config(tmp_path, "model.offset=.nan"), out_dir=tmp_path / "run")


def test_loss_guard_stops_a_loss_above_the_cap(toys, tmp_path):
    with pytest.raises(DetkitError, match=r"exceeded train.loss_guard.max_loss 100"):
        train(toy_config(tmp_path, "model.offset=1000", "train.loss_guard.max_loss=100"),
              out_dir=tmp_path / "run")
    # Below the cap it trains.
    train(toy_config(tmp_path, "model.offset=10", "train.loss_guard.max_loss=100"), out_dir=tmp_path / "ok")


def test_loss_guard_cap_is_on_by_default_even_in_a_short_run(toys, tmp_path):
    # Two steps, one log point (the epoch's end): far fewer than the ratio's history.
    short = ("train.log_interval=20",)
    with pytest.raises(DetkitError, match=r"^loss 5\d{3}(\.\d+)? exceeded train.loss_guard.max_loss 1000 at step 2"):
        train(toy_config(tmp_path, "model.offset=5000", *short), out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()
    train(toy_config(tmp_path, "model.offset=50", *short), out_dir=tmp_path / "ok")  # high, not absurd
    train(toy_config(tmp_path, "model.offset=5000", "train.loss_guard.max_loss=null", *short),
          out_dir=tmp_path / "off")
    with pytest.raises(ConfigError, match=r"train.loss_guard.max_loss: Input should be a finite number"):
        toy_config(tmp_path, "train.loss_guard.max_loss=.inf")


def test_a_wild_learning_rate_stops_a_short_run_before_best_pt(tmp_path, tiny_dict, write_tiny):
    tiny_dict["train"].update(epochs=1, optimizer={"type": "sgd", "lr": 1.0e6}, scheduler={"type": "constant"})
    path = write_tiny(tiny_dict, "wild.yaml")
    with pytest.raises(DetkitError, match=r"exceeded train.loss_guard.max_loss 1000 at step 2: lower train.optimizer.lr"):
        train(load_config(path), out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_loss_guard_ratio_to_the_recent_median(toys, tmp_path):
    from detkit.engine.hooks import NonFiniteLossHook

    hook = NonFiniteLossHook(LossGuardConfig(max_ratio=3.0, history=2), checkpoint_every_iters=None)
    window = SimpleNamespace(mean=lambda: {"total": values[-1]})
    hook.loop = SimpleNamespace(log_now=lambda: True, window=window, step=7)
    values = []
    for v in (1.0, 1.2, 2.0):  # 2.0 < 3 x median(1.0, 1.2)
        values.append(v)
        hook.after_step()
    values.append(10.0)
    with pytest.raises(DetkitError, match=r"over 3x the recent median 1.6 .*at step 7"):
        hook.after_step()


# ------------------------------------------------------- interrupts, transforms
class InterruptAt(Hook):
    """Ctrl-C after step ``step`` (after the checkpoint hook)."""

    priority = 70

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        step: int

    def __init__(self, params: "InterruptAt.Params"):
        self.step = params.step

    def after_step(self):
        if self.loop.step == self.step:
            raise KeyboardInterrupt


def test_keyboard_interrupt_names_the_saved_step(toys, tmp_path):
    import io

    registry("hook").register("interrupt_at")(InterruptAt)
    out = io.StringIO()
    cfg = toy_config(tmp_path, "data.batch_size=2", "train.checkpoint_every_iters=2",
                     "train.hooks=[{type: recorder}, {type: interrupt_at, step: 3}]")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out_dir=tmp_path / "run", console=Console(file=out, width=200))
    last = tmp_path / "run" / "last.pt"
    assert f"interrupted at step 3; {last} holds step 2 (continue with --resume {last})" in out.getvalue()
    assert load_checkpoint(last)["step"] == 2
    assert EVENTS[-1] == ("after_train", False)  # hooks still closed their files


def test_transform_steps_from_the_config_train(toys, tmp_path):
    run = train(toy_config(tmp_path, "data.transforms=[{type: hflip, p: 0.25}, {type: photometric}]"),
                out_dir=tmp_path / "run")
    assert load_checkpoint(run / "last.pt")["config"]["data"]["transforms"][0] == {"type": "hflip", "p": 0.25}


def test_compile_asks_the_detector_what_to_compile(toys, tmp_path, monkeypatch):
    import io

    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    out = io.StringIO()
    train(toy_config(tmp_path, "train.compile=true"), out_dir=tmp_path / "a", console=Console(file=out, width=300))
    assert compiled == [] and "train.compile: toy_detector names no modules to compile" in out.getvalue()
    monkeypatch.setattr(ToyDetector, "compile_modules", lambda self: [self.lin], raising=False)
    train(toy_config(tmp_path, "train.compile=true"), out_dir=tmp_path / "b", console=Console(file=io.StringIO()))
    assert compiled == ["Linear"]


def test_the_lr_schedule_advances_once_per_optimizer_step(toys, tmp_path):
    run = train(toy_config(tmp_path, "train.epochs=2", "data.batch_size=2", "train.accumulate=2",
                           "train.scheduler={type: constant, warmup_iters: 4, warmup_factor: 0.5}"),
                out_dir=tmp_path / "run")
    # The record is written after the schedule moved on: the lr of the next step.
    assert [r["lr"] for r in records(run)] == pytest.approx([0.05 * f for f in (0.625, 0.75, 0.875, 1.0)])


@pytest.mark.slow
def test_accumulation_under_torchrun_with_ddp(tmp_path, tiny_config):
    """Two gloo processes, DistributedDataParallel, 2 micro-batches per step (no_sync on the first)."""
    import os
    import socket
    import subprocess
    import sys

    config = tiny_config
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "detkit.cli", "train", str(config), "--out", str(tmp_path / "run"), "--set", "data.batch_size=2",
         "--set", "train.accumulate=2", "--set", "eval.interval=0"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 8 images / 2 processes / batch 2 = 2 micro-batches per rank and epoch: one optimizer step.
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (2, 2)
    assert all(r["total"] > 0 for r in records(tmp_path / "run"))


def test_loss_window_averages_each_name_over_the_steps_that_have_it():
    from detkit.engine.train import LossWindow

    w = LossWindow()
    w.add({"a": torch.tensor(1.0), "total": torch.tensor(2.0)})
    w.add({"a": torch.tensor(3.0), "b": torch.tensor(5.0), "total": torch.tensor(4.0)})
    assert w.mean() == {"a": 2.0, "total": 3.0, "b": 5.0} and len(w) == 2
    w.reset()
    assert w.mean() == {}


@pytest.mark.slow
def test_faster_rcnn_resumed_mid_epoch_equals_an_uninterrupted_run(toys, tmp_path, tiny_config):
    path = tiny_config
    common = ["eval.interval=0", "data.batch_size=2", "train.trainer.seed=3", "data.transforms.hflip=0.5"]
    straight = train(load_config(path, common), out_dir=tmp_path / "straight")
    split = train(load_config(path, [*common, "train.hooks=[{type: stop_at, step: 5}]"]), out_dir=tmp_path / "split")
    assert load_checkpoint(split / "last.pt")["epoch_step"] == 1  # 4 steps per epoch: stopped inside epoch 2
    train(load_config(path, common), out_dir=split, resume=split / "last.pt")
    a, b = load_checkpoint(straight / "last.pt")["model"], load_checkpoint(split / "last.pt")["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    assert [r["total"] for r in records(split)] == pytest.approx([r["total"] for r in records(straight)], rel=1e-5)


def test_boxes_dropped_by_augmentation_are_counted_each_epoch(toys, tmp_path, capsys):
    # Crops of a tenth of the image drop some of the synthetic set's boxes.
    run = train(toy_config(tmp_path, "data.transforms=[{type: random_resized_crop, scale: [0.1, 0.1], p: 1.0}]",
                           "train.epochs=2"), out_dir=tmp_path / "run")
    counts = records(run, "augment")
    assert [r["epoch"] for r in counts] == [0, 1]
    assert all(r["boxes_dropped"] > 0 and r["boxes_kept"] >= 0 for r in counts)
    ds_boxes = sum(len(t["boxes"]) for _, t in build_dataset(load_config(tmp_path / "toy.yaml").data, "train",
                                                             augment=False))
    assert all(r["boxes_dropped"] + r["boxes_kept"] == ds_boxes for r in counts)  # every box, counted once
    out = capsys.readouterr().out
    assert f"epoch 1: augmentation dropped {counts[0]['boxes_dropped']} boxes" in out
