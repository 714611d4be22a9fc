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

CONFIG = """
name: nosync
model:
  type: faster_rcnn
  backbone: {type: tiny, channels: [8, 16, 16, 32], tail_features: 32}
  rpn:
    type: rpn
    mid_channels: 16
    anchor: {scales: [1, 2, 4], offset: 0.5}
    proposal: {train_pre_nms: 200, train_post_nms: 32, test_pre_nms: 200, test_post_nms: 16, min_size: 2}
  roi_head: {type: roi_head, pool: roi_align, sampling_ratio: 1}
  preprocess: {min_size: 64, max_size: 64}
data:
  train: {type: synthetic, num_images: 12, image_size: [64, 64], object_size: [16, 32], split: train}
  batch_size: 2
  transforms: {min_size: 64, max_size: 64}
train:
  epochs: 1
  trainer:
    type: faster_rcnn_trainer
    seed: 0
    anchor_target: {type: anchor_target, n_sample: 32}
    proposal_target: {type: proposal_target, n_sample: 16}
  optimizer: {type: sgd, lr: 0.01, momentum: 0.9}
  log_interval: 4
eval: {interval: 0}
"""

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def run_checked(tmp_path, monkeypatch, inject_read: bool = False) -> dict:
    """Train CONFIG with host reads recorded in the steady state; returns what was recorded."""
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
    run_step, call = Loop.run_step, Loop.call

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

    def checked_run_step(self, batches, micro_batches):
        state["on"] = self.step >= 1  # the first step sets things up once
        state["checked_steps"] += state["on"]
        try:
            return run_step(self, Fetched(batches), micro_batches)
        finally:
            state["on"] = False

    def checked_call(self, event):
        state["on"] = event in ("before_step", "after_step") and self.step >= 2 and not self.log_now()
        try:
            return call(self, event)
        finally:
            state["on"] = False

    monkeypatch.setattr(Loop, "run_step", checked_run_step)
    monkeypatch.setattr(Loop, "call", checked_call)
    if inject_read:  # the control: a loss read each step, as a naive loss guard would do
        to_device = Loop.to_device
        monkeypatch.setattr(Loop, "to_device", lambda self, b: (float(b.images.sum()), to_device(self, b))[1])
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG)
    train_module.train(load_config(path), config_path=path, out_dir=tmp_path / "run")
    return state


@pytest.mark.slow
def test_steady_state_loop_reads_no_tensor_data(tmp_path, monkeypatch):
    state = run_checked(tmp_path, monkeypatch)
    assert state["checked_steps"] == 5  # 6 steps, the first not checked
    assert not state["reads"], "host reads in the steady-state loop:\n" + "\n".join(state["reads"][:3])


@pytest.mark.slow
def test_a_read_in_the_step_is_caught(tmp_path, monkeypatch):
    state = run_checked(tmp_path, monkeypatch, inject_read=True)
    assert len(state["reads"]) == 5 and "__float__" in state["reads"][0]
