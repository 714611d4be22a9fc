"""One line, no traceback: truncated checkpoints in every command that reads one, and `--out` paths
that cannot be written (export, predict)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from detkit.cli import app
from detkit.engine.checkpoint import save_checkpoint
from detkit.errors import CheckpointError, OutputError
from detkit.registry import registry

runner = CliRunner()

@pytest.fixture
def config_dict(tiny_dict) -> dict:
    """The shared tiny config (tests/conftest.py), one epoch, no evaluation."""
    tiny_dict["train"]["epochs"] = 1
    tiny_dict["eval"]["interval"] = 0
    return tiny_dict


@pytest.fixture
def checkpoint(tmp_path, config_dict) -> Path:
    from detkit.config import validate

    cfg = validate(config_dict).to_dict()
    torch.manual_seed(0)
    model = registry("detector").build(cfg["model"], num_classes=4)
    classes = ["circle", "square", "triangle", "cross"]
    return save_checkpoint(tmp_path / "m.pt", model=model.state_dict(), config=cfg, classes=classes)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def one_line(result) -> str:
    text = result.output.strip()
    assert "\n" not in text and "Traceback" not in text, text
    return text


# --------------------------------------------------------- truncated files
@pytest.mark.parametrize("keep", [20_000, 0.5, 0.98], ids=["20kB", "half", "all-but-the-end"])
def test_a_truncated_checkpoint_is_one_line_in_every_command(checkpoint, image, tmp_path, keep, config_dict):
    data = checkpoint.read_bytes()
    size = keep if isinstance(keep, int) else int(len(data) * keep)
    assert size < len(data)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:size])
    config = tmp_path / "config.yaml"
    import yaml

    config.write_text(yaml.safe_dump(config_dict))
    commands = {
        "predict": ["predict", str(cut), str(image), "--out", str(tmp_path / "pred")],
        "eval": ["eval", str(cut), "--config", str(config), "--out", str(tmp_path / "ev")],
        "resume": ["train", str(config), "--resume", str(cut), "--out", str(tmp_path / "run")],
        "import-weights": ["import-weights", str(cut), str(tmp_path / "imported.pt"), "--backbone", "vgg16"],
    }
    for name, argv in commands.items():
        result = runner.invoke(app, argv)
        line = one_line(result)
        assert result.exit_code == CheckpointError.exit_code, (name, line)
        assert line.startswith(f"error: {cut}: ") and "truncated or corrupt" in line, (name, line)
    assert not (tmp_path / "imported.pt").exists() and not (tmp_path / "run").exists()


def test_debug_keeps_the_traceback(checkpoint, image, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(checkpoint.read_bytes()[:20_000])
    result = runner.invoke(app, ["--debug", "predict", str(cut), str(image), "--out", str(tmp_path / "pred")])
    assert result.exit_code == 2 and "Traceback" in result.output and "truncated or corrupt" in result.output


# --------------------------------------------------------------- --out paths
def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes anywhere on a normal file system; sysfs refuses new entries
        return Path("/sys/detkit-test-out/model.pt")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "model.pt"


def test_export_out_that_cannot_be_written_is_one_line(checkpoint, tmp_path):
    existing = tmp_path / "exports"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    regular = tmp_path / "notes.txt"
    regular.write_text("notes")
    cases = {
        "an existing directory": (existing, "is a directory"),
        "a path under a regular file": (regular / "model.pt", f"{regular} is a file, not a directory"),
        "an unwritable path": (_unwritable(tmp_path), "not writable|cannot"),
    }
    import re

    for name, (out, reason) in cases.items():
        result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out), "--format", "torchscript"])
        line = one_line(result)
        assert result.exit_code == OutputError.exit_code == 2, (name, line)
        assert line.startswith(f"error: --out {out}: ") and re.search(reason, line), (name, line)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and regular.read_text() == "notes"
    # --out is checked before the checkpoint is read (which can take long for a large one)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(checkpoint.read_bytes()[:20_000])
    result = runner.invoke(app, ["export", str(cut), "--out", str(existing), "--format", "torchscript"])
    assert result.exit_code == 2 and one_line(result).startswith(f"error: --out {existing}: is a directory")


def test_predict_out_a_regular_file_is_one_line(checkpoint, image, tmp_path):
    out = tmp_path / "predictions"
    out.write_text("not a directory")
    result = runner.invoke(app, ["predict", str(checkpoint), str(image), "--out", str(out)])
    line = one_line(result)
    assert result.exit_code == 2 and line == f"error: --out {out}: is a file, not a directory"
    assert out.read_text() == "not a directory"
    under = out / "sub"
    result = runner.invoke(app, ["predict", str(checkpoint), str(image), "--out", str(under)])
    assert result.exit_code == 2 and one_line(result) == f"error: --out {under}: {out} is a file, not a directory"
    result = runner.invoke(app, ["predict", str(checkpoint), str(image), "--out", str(_unwritable(tmp_path).parent)])
    assert result.exit_code == 2 and one_line(result).startswith("error: --out ")
