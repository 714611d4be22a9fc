"""Issue 9 case 15: a run stores absolute data paths; a missing path says what it was resolved against."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from detkit.cli import app
from detkit.config import load_config
from detkit.data.paths import absolute_data_paths
from detkit.errors import DataError
from detkit.registry import registry

runner = CliRunner()

VOC = {"type": "voc", "root": "data/voc", "split": "train", "classes": ["circle", "square"]}


@pytest.fixture
def config(tiny_dict) -> dict:
    """The shared tiny config on a VOC set at the relative path data/voc, for one epoch."""
    tiny_dict["data"].update(train=dict(VOC), val=dict(VOC), batch_size=2)
    tiny_dict["train"]["epochs"] = 1
    return tiny_dict


def test_relative_data_paths_become_absolute_against_the_working_directory(tmp_path, monkeypatch, config):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = absolute_data_paths(load_config(path, ["data.val=null"]))
    assert cfg.to_dict()["data"]["train"]["root"] == str(tmp_path / "data" / "voc")
    assert cfg.to_dict()["data"]["train"]["split"] == "train"  # only path fields change
    assert cfg.to_dict()["model"] == load_config(path).to_dict()["model"]


def test_a_missing_path_says_what_it_was_resolved_against(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        registry("dataset").build({"type": "voc", "root": "data/voc"})
    assert f"(root: 'data/voc' resolved against the working directory {tmp_path})" in str(info.value)
    with pytest.raises(DataError) as info:
        registry("dataset").build({"type": "coco", "root": "images", "annotations": "a.json"})
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'images'}: COCO image directory not found")
    assert f"root: 'images' resolved against the working directory {tmp_path}" in msg


@pytest.mark.slow
def test_eval_and_resume_work_from_another_directory(tmp_path, monkeypatch, config):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    res = runner.invoke(app, ["data", "synth", "data/voc", "-n", "4", "--image-size", "64",
                              "--classes", "circle,square"])
    assert res.exit_code == 0, res.output
    (project / "cfg.yaml").write_text(yaml.safe_dump(config))
    res = runner.invoke(app, ["train", "cfg.yaml", "--out", "runs/x"])
    assert res.exit_code == 0, res.output
    stored = yaml.safe_load((project / "runs" / "x" / "config.yaml").read_text())
    assert stored["data"]["train"]["root"] == str(project / "data" / "voc")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    best = project / "runs" / "x" / "best.pt"
    res = runner.invoke(app, ["eval", str(best), "--out", str(elsewhere / "eval")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", str(project / "cfg.yaml"), "--set", "train.epochs=2",
                              "--set", f"data.train.root={project / 'data' / 'voc'}", "--set", "data.val=null",
                              "--out", str(project / "runs" / "x"), "--resume", str(project / "runs" / "x" / "last.pt")])
    assert res.exit_code == 0, res.output
    # Data moved away since: the message says the path came from the checkpoint.
    (project / "data").rename(project / "data_moved")
    res = runner.invoke(app, ["eval", str(best), "--out", str(elsewhere / "eval2")])
    assert res.exit_code == 1
    assert f"(root: {project / 'data' / 'voc'})" in res.output
    assert f"(data.val as stored in {best}; pass --config to read other data)" in res.output
