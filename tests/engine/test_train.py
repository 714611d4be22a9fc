"""End to end: `detkit train` on a tiny config, checkpoints, metrics, resume, eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from detkit.config import load_config
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.train import train

def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_train_writes_checkpoints_metrics_and_plot(tiny_config, tmp_path):
    run_dir = train(load_config(tiny_config), config_path=tiny_config, out_dir=tmp_path / "run")
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "losses.png"}
    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 2 and last["step"] == 4  # 8 images / batch 4 = 2 iterations per epoch
    assert set(last) >= {"model", "optimizer", "scheduler", "trainer_state", "config", "classes", "versions"}
    assert last["classes"] == ["circle", "square", "triangle", "cross"]
    train_records = records(run_dir, "train")
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert all(set(r) >= {"rpn_loc", "rpn_cls", "roi_loc", "roi_cls", "total", "lr", "images_per_s"}
               for r in train_records)
    for r in train_records:
        parts = r["rpn_loc"] + r["rpn_cls"] + r["roi_loc"] + r["roi_cls"]
        assert r["total"] == pytest.approx(parts, rel=1e-5)
    evals = records(run_dir, "eval")
    assert [e["epoch"] for e in evals] == [0, 1] and all(0.0 <= e["mAP"] <= 1.0 for e in evals)
    assert (run_dir / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_from_the_saved_step(tiny_config, tmp_path):
    cfg1 = load_config(tiny_config, ["train.epochs=1", "eval.interval=0"])
    run_dir = train(cfg1, out_dir=tmp_path / "run")
    first = load_checkpoint(run_dir / "last.pt")
    assert (first["epoch"], first["step"]) == (1, 2)
    cfg2 = load_config(tiny_config, ["train.epochs=2", "eval.interval=0"])
    train(cfg2, out_dir=run_dir, resume=run_dir / "last.pt")
    second = load_checkpoint(run_dir / "last.pt")
    assert (second["epoch"], second["step"]) == (2, 4)
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 3, 4]
    # Resuming restored the optimizer: SGD momentum buffers exist from the first run.
    assert any("momentum_buffer" in s for s in second["optimizer"]["state"].values())
    changed = [k for k, v in second["model"].items() if v.is_floating_point() and not torch.equal(v, first["model"][k])]
    assert changed, "the second epoch trained the model"


@pytest.mark.slow  # subprocesses: seconds each
def test_cli_train_and_eval(tiny_config, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "detkit.cli", "train", str(tiny_config), "--out", str(tmp_path / "r"),
         "--set", "train.epochs=1"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "done in" in run.stdout
    out = tmp_path / "metrics.json"
    ev = subprocess.run(
        [sys.executable, "-m", "detkit.cli", "eval", str(tmp_path / "r" / "last.pt"), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert ev.returncode == 0, ev.stderr
    result = json.loads(out.read_text())
    assert 0.0 <= result["mAP"] <= 1.0 and result["images"] == 4


@pytest.mark.slow  # subprocesses: seconds each
def test_missing_voc_data_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "detkit.cli", "train", "configs/frcnn_vgg.yaml",
         "--set", "model.backbone.pretrained=null", "--set", f"data.train.root={tmp_path}/VOCdevkit/VOC2007"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "VOC2007" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_frozen_backbone_phase_then_unfrozen(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["train.epochs=2", "eval.interval=0", "train.freeze_backbone_epochs=1",
                                    "train.freeze_batch_size=2"])
    run_dir = train(load_config(tiny_config, ["train.epochs=1", "eval.interval=0", "train.freeze_backbone_epochs=1",
                                              "train.freeze_batch_size=2", "train.optimizer.weight_decay=0"]),
                    out_dir=tmp_path / "frozen")
    after_frozen = load_checkpoint(run_dir / "last.pt")
    # The frozen epoch used its own batch size: 8 images / 2 = 4 steps.
    assert after_frozen["step"] == 4
    torch.manual_seed(0)  # the same initial weights as the run above (seeded by train.seed)
    from detkit.registry import registry

    fresh = registry("detector").build(cfg.model, num_classes=4)
    trunk = [k for k in after_frozen["model"] if k.startswith("backbone.stages.") and k.endswith(".weight")]
    head = [k for k in after_frozen["model"] if k.startswith("roi_head.score")]
    assert trunk and head
    assert all(torch.equal(after_frozen["model"][k], fresh.state_dict()[k]) for k in trunk)
    assert not all(torch.equal(after_frozen["model"][k], fresh.state_dict()[k]) for k in head)
    # Unfrozen afterwards: the second epoch (batch 4) changes the trunk.
    train(cfg, out_dir=run_dir, resume=run_dir / "last.pt")
    after = load_checkpoint(run_dir / "last.pt")
    assert after["step"] == 4 + 2
    assert not all(torch.equal(after["model"][k], after_frozen["model"][k]) for k in trunk)


@pytest.mark.parametrize("amp", [True, False])
def test_train_amp_runs_the_loops_forward_under_autocast(tiny_config, tmp_path, amp):
    """train.amp reaches the trainer the loop steps with: on the CPU the network then computes in
    bfloat16 (a conv's output), and in float32 without it."""
    from rich.console import Console

    from detkit.engine.distributed import DistInfo
    from detkit.engine.train import TrainLoop

    cfg = load_config(tiny_config, ["train.epochs=1", "eval.interval=0", f"train.amp={str(amp).lower()}"])
    loop = TrainLoop(cfg, tmp_path / "run", Console(quiet=True), torch.device("cpu"), DistInfo())
    assert loop.trainer.amp.enabled is amp and loop.amp is loop.trainer.amp
    conv = next(m for m in loop.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    loop.model.train()
    losses = loop.optimizer_step(loop.batches(0), 1)
    assert seen and set(seen) == {torch.bfloat16 if amp else torch.float32}
    assert torch.isfinite(losses["total"]) and losses["total"] > 0


def test_tensorboard_without_the_package_is_a_clear_error(tiny_config, tmp_path, monkeypatch):
    from detkit.errors import ConfigError

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed, as find_spec sees it
    with pytest.raises(ConfigError, match=r"train.tensorboard: hook 'tensorboard' needs the tensorboard package, "
                                          r"which is not installed: pip install 'detkit\[tensorboard\]'"):
        train(load_config(tiny_config, ["train.epochs=1", "eval.interval=0", "train.tensorboard=true"]),
              out_dir=tmp_path / "tb")
    assert not (tmp_path / "tb").exists()  # refused before the run directory (and its config.yaml) is written


@pytest.mark.parametrize("trainer_seed", [None, 7], ids=["global-generator", "trainer-seed"])
def test_resumed_run_equals_an_uninterrupted_one(tiny_config, tmp_path, trainer_seed):
    overrides = ["eval.interval=0", "data.transforms.hflip=0.5", f"train.trainer.seed={trainer_seed or 'null'}"]
    straight = train(load_config(tiny_config, ["train.epochs=2", *overrides]), out_dir=tmp_path / "straight")
    split = train(load_config(tiny_config, ["train.epochs=1", *overrides]), out_dir=tmp_path / "split")
    train(load_config(tiny_config, ["train.epochs=2", *overrides]), out_dir=split, resume=split / "last.pt")
    a = load_checkpoint(straight / "last.pt")["model"]
    b = load_checkpoint(split / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    la = [r["total"] for r in records(straight, "train")]
    lb = [r["total"] for r in records(split, "train")]
    assert la == pytest.approx(lb, rel=1e-5)


def test_bad_out_dir_placeholder_is_a_config_error(tiny_config):
    from detkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.out_dir: 'runs/\{date\}' may only use the placeholder \{name\}"):
        train(load_config(tiny_config, ["train.out_dir=runs/{date}"]))


def test_cudnn_benchmark_auto_turns_off_when_batch_shapes_keep_changing(monkeypatch):
    """Scale jitter gives dozens of batch shapes; cuDNN's per-shape timing then costs more
    than it saves (ResNet50-GN trained at 1-6 instead of ~50 images/s on an H100)."""
    import torch
    from rich.console import Console

    from detkit.sections import TrainConfig
    from detkit.engine.train import CUDNN_AUTO_MAX_SHAPES, TrainLoop

    assert TrainConfig().cudnn_benchmark == "auto"
    assert TrainConfig(cudnn_benchmark=False).cudnn_benchmark is False
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    loop = TrainLoop.__new__(TrainLoop)
    loop.console = Console(quiet=True)
    loop._cudnn_shapes = set()

    def preprocessed(*shape):  # what the detector's preprocess module returns: (ImageBatch, targets)
        return (SimpleNamespace(tensor=torch.zeros(shape)), None)

    for _ in range(3):  # the same few shapes again and again: keep tuning them
        for h in range(CUDNN_AUTO_MAX_SHAPES):
            loop._watch_batch_shapes(None, (), preprocessed(2, 3, 320 + 32 * h, 480))
    assert torch.backends.cudnn.benchmark is True
    loop._watch_batch_shapes(None, (), preprocessed(2, 3, 1024, 480))  # one shape too many
    assert torch.backends.cudnn.benchmark is False and loop._cudnn_shapes is None
