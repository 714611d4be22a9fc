"""Shared fixtures: fake plugin distributions and isolated registries."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from detkit import registry as plugin_registry
from detkit.registry import REGISTRIES

# Two cores: keep torch from oversubscribing when tests run beside other work.
torch.set_num_threads(min(2, torch.get_num_threads()))


def write_distribution(
    root: Path, dist: str, version: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]
) -> Path:
    """Lay out an installed distribution (dist-info + modules) under ``root``."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for rel, code in modules.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
    return root


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A temporary directory on sys.path for fake distributions; rediscovers after."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(dist, version, entry_points, modules):
        write_distribution(site, dist, version, entry_points, modules)
        plugin_registry.discover(force=True)

    yield make
    # Forget the fake modules and entries so other tests see the real install.
    for name in list(sys.modules):
        if name.startswith("fake_"):
            del sys.modules[name]
    monkeypatch.undo()
    plugin_registry.discover(force=True)


@pytest.fixture
def clean_registry():
    """Snapshot every registry and restore it after the test."""
    # Discover first: a snapshot taken before discovery would restore empty
    # registries that are marked as discovered, hiding the installed plugins.
    plugin_registry.discover()
    saved = {kind: dict(reg._entries) for kind, reg in REGISTRIES.items()}
    yield
    for kind, reg in REGISTRIES.items():
        reg._entries = saved[kind]


# ------------------------------------------------------ the tiny training run
# The one tiny config the end-to-end tests train (engine, data, evaluation, API,
# torchrun): a 64 px Faster R-CNN on 8 synthetic images, 2 steps per epoch.
# Variants take --set overrides or edit the parsed dict (tiny_config_dict),
# never a copy of this text.
TINY_CONFIG = """
name: tiny
model:
  type: faster_rcnn
  backbone: {type: tiny, channels: [8, 16, 16, 32], tail_features: 32}
  rpn:
    type: rpn
    mid_channels: 16
    anchor: {scales: [1, 2, 4], offset: 0.5}
    proposal: {train_pre_nms: 200, train_post_nms: 32, test_pre_nms: 200, test_post_nms: 16, min_size: 2}
    anchor_target: {type: anchor_target, n_sample: 32}
  roi_head:
    type: roi_head
    pooler: {type: roi_pool}
    proposal_target: {type: proposal_target, n_sample: 16}
  preprocess: {min_size: 64, max_size: 64}
data:
  train: {type: synthetic, num_images: 8, image_size: [64, 64], object_size: [16, 32], split: train}
  val: {type: synthetic, num_images: 4, image_size: [64, 64], object_size: [16, 32], split: val}
  batch_size: 4
train:
  epochs: 2
  trainer: {type: faster_rcnn_trainer}
  optimizer: {type: sgd, lr: 0.01}
  log_interval: 1
eval: {interval: 1, score_thresh: 0.0}
"""



@pytest.fixture
def tiny_dict() -> dict:
    """A fresh parsed copy of :data:`TINY_CONFIG`, for variants edited as data."""
    import yaml

    return yaml.safe_load(TINY_CONFIG)


@pytest.fixture
def write_tiny(tmp_path):
    """``write_tiny(config=None, name="tiny.yaml") -> path``: a config dict (default: the tiny config) as YAML in tmp_path."""
    import yaml

    def write(config: dict | None = None, name: str = "tiny.yaml") -> Path:
        path = tmp_path / name
        path.write_text(TINY_CONFIG if config is None else yaml.safe_dump(config, sort_keys=False))
        return path

    return write


@pytest.fixture
def tiny_config(write_tiny) -> Path:
    """:data:`TINY_CONFIG` written to ``tmp_path/tiny.yaml``."""
    return write_tiny()


@pytest.fixture
def tiny_checkpoint(tiny_dict):
    """``tiny_checkpoint(path, classes, confident=True) -> path``: an untrained detector of the tiny
    config saved as a detkit checkpoint; ``confident``: every RoI becomes a sure last class with the
    RoI as its box, so prediction has detections to check."""
    from detkit.config import validate
    from detkit.engine.checkpoint import save_checkpoint
    from detkit.registry import registry

    def make(path: Path, classes: list[str], confident: bool = True) -> Path:
        cfg = validate(tiny_dict).to_dict()
        torch.manual_seed(0)
        model = registry("detector").build(cfg["model"], num_classes=len(classes))
        if confident:
            with torch.no_grad():
                bias = torch.zeros(len(classes) + 1)
                bias[-1] = 10.0
                model.roi_head.score.bias.copy_(bias)
        return save_checkpoint(path, model=model.state_dict(), config=cfg, classes=list(classes))

    return make
