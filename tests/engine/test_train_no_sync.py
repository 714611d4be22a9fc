"""The steady-state training loop never reads tensor data on the host (what would stall a GPU).

Like ``no_host_reads`` in tests/builtins/test_targets.py, but over the whole
loop: every Python-level read of tensor data (``item``, ``tolist``, ``bool``,
``int``, ...) made while a step runs (data already fetched) or while the hooks
run after a step that does not log is recorded with its stack.  Reads by the
data loader (host tensors it builds itself), on the first step (one-time set-up),
and at logging steps (one read per window, by design) are allowed.
"""

from __future__ import annotations

import traceback

import pytest
import torch

from detkit.config import load_config
from detkit.engine import train as train_module

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def config(tiny_dict, write_tiny):
    """The shared tiny config, 6 steps of 2 images, RoI align, a seeded trainer, logging every 4 steps."""
    tiny_dict["model"]["roi_head"]["pooler"] = {"type": "roi_align", "sampling_ratio": 1}
    tiny_dict["data"].update(train={**tiny_dict["data"]["train"], "num_images": 12}, val=None, batch_size=2)
    tiny_dict["train"].update(epochs=1, log_interval=4, optimizer={"type": "sgd", "lr": 0.01, "momentum": 0.9},
                              trainer={"type": "faster_rcnn_trainer", "seed": 0})
    tiny_dict["eval"] = {"interval": 0}
    return write_tiny(tiny_dict)


def run_checked(path, tmp_path, monkeypatch, inject_read: bool = False) -> dict:
    """Train the config at ``path`` with host reads recorded in the steady state; returns what was recorded."""
    state = {"on": False, "reads": [], "checked_steps": 0}

    def recording(name, original):
        def read(self, *args, **kwargs):
            if state["on"]:
                state["reads"].append(f"Tensor.{name}:\n" + "".join(traceback.format_stack(limit=8)[:-1]))
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, recording(name, getattr(torch.Tensor, name)))

    Loop = train_module.TrainLoop
    optimizer_step, call = Loop.optimizer_step, Loop.call

    class Fetched:
        """The batch iterator with checks off: the loader builds host tensors itself."""

        def __init__(self, it):
            self.it = it

        def __next__(self):
            was, state["on"] = state["on"], False
            try:
                return next(self.it)
            finally:
                state["on"] = was

    def checked_optimizer_step(self, batches, micro_batches):
        state["on"] = self.step >= 1  # the first step sets things up once
        state["checked_steps"] += state["on"]
        try:
            return optimizer_step(self, Fetched(batches), micro_batches)
        finally:
            state["on"] = False

    def checked_call(self, event):
        state["on"] = event in ("before_step", "after_step") and self.step >= 2 and not self.log_now()
        try:
            return call(self, event)
        finally:
            state["on"] = False

    monkeypatch.setattr(Loop, "optimizer_step", checked_optimizer_step)
    monkeypatch.setattr(Loop, "call", checked_call)
    if inject_read:  # the control: a loss read each step, as a naive loss guard would do
        from detkit_builtins.trainer import FasterRCNNTrainer

        run_step = FasterRCNNTrainer.run_step

        def reading_run_step(self, micro_batches):
            losses = run_step(self, micro_batches)
            float(losses["total"])
            return losses

        monkeypatch.setattr(FasterRCNNTrainer, "run_step", reading_run_step)
    train_module.train(load_config(path), config_path=path, out_dir=tmp_path / "run")
    return state


@pytest.mark.slow
def test_steady_state_loop_reads_no_tensor_data(config, tmp_path, monkeypatch):
    state = run_checked(config, tmp_path, monkeypatch)
    assert state["checked_steps"] == 5  # 6 steps, the first not checked
    assert not state["reads"], "host reads in the steady-state loop:\n" + "\n".join(state["reads"][:3])


@pytest.mark.slow
def test_a_read_in_the_step_is_caught(config, tmp_path, monkeypatch):
    state = run_checked(config, tmp_path, monkeypatch, inject_read=True)
    assert len(state["reads"]) == 5 and "__float__" in state["reads"][0]
