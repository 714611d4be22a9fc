"""The CLI through subprocesses (exit codes, stderr) and typer's CliRunner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from detkit.cli import app

REPO = Path(__file__).resolve().parents[2]
DETKIT = [sys.executable, "-m", "detkit.cli"]
runner = CliRunner()


def run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DETKIT, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd or REPO
    )


def test_list_plugins_json_shows_builtins_without_importing_them():
    result = runner.invoke(app, ["list-plugins", "--json", "--kind", "detector"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    row = next(r for r in rows if r["name"] == "faster_rcnn")
    assert row["distribution"] == "detkit"
    assert row["target"] == "detkit_builtins.faster_rcnn:FasterRCNN"
    assert row["kind"] == "detector"


def test_unknown_kind_is_a_usage_error():
    result = runner.invoke(app, ["list-plugins", "--kind", "bakbone"])
    assert result.exit_code == 2
    assert "unknown component kind 'bakbone'" in result.output


@pytest.mark.slow  # subprocesses: seconds each
def test_config_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {type: faster_rcnn}\ndata: {train: {type: synthetic}}\ntrian: {}\n")
    proc = run("config", "validate", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: trian: Extra inputs are not permitted"
    assert "Traceback" not in proc.stderr
    proc = run("--debug", "config", "validate", str(bad))
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_missing_config_file():
    proc = run("config", "show", "no/such.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: no/such.yaml: config file not found"


@pytest.mark.slow
def test_third_party_plugin_installed_to_a_target_dir(tmp_path):
    target = tmp_path / "site"
    # pip builds in the project folder (build/, *.egg-info): build a copy, never the source tree.
    source = shutil.copytree(REPO / "plugins" / "detkit-example-backbone", tmp_path / "example",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        capture_output=True, text=True,
    )
    assert pip.returncode == 0, pip.stderr
    env = {"PYTHONPATH": str(target)}
    proc = run("list-plugins", "--kind", "backbone", "--json", "--load", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["resnet18"]["distribution"] == "detkit-example-backbone"
    assert rows["resnet18"]["version"] == "0.1.0"
    assert rows["resnet18"]["status"] == "ok"
    # Built from a config through the registry, in a fresh interpreter.
    code = (
        "import torch; from detkit.registry import registry;"
        "b = registry('backbone').build({'type': 'resnet18', 'freeze_stages': 1});"
        "f = b(torch.zeros(1, 3, 64, 64)); print(tuple(f.shape), b.out_channels,"
        " sum(not p.requires_grad for p in b.parameters()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(1,", "256,", "4,", "4)", "256", "3"]
    # With autoload disabled the third-party backbone disappears, built-ins stay.
    proc = run("list-plugins", "--kind", "backbone", "--json", env={**env, "DETKIT_DISABLE_PLUGIN_AUTOLOAD": "1"},
               cwd=tmp_path)
    names = {r["name"] for r in json.loads(proc.stdout)}
    assert "resnet18" not in names and "vgg16" in names


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("detkit ")


def test_config_schema_lists_each_installed_plugin_with_its_parameters():
    result = runner.invoke(app, ["config", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert set(schema["properties"]) == {"name", "model", "data", "train", "eval"}
    defs = schema["$defs"]
    assert defs["backbone_vgg16"]["properties"]["type"]["const"] == "vgg16"
    assert "freeze_stages" in defs["backbone_vgg16"]["properties"]
    assert defs["dataset_voc"]["properties"]["type"]["const"] == "voc"


@pytest.mark.parametrize("name", ["quickstart", "frcnn_vgg", "frcnn_resnet50"])
def test_shipped_configs_validate_and_show_resolved_defaults(name):
    import yaml

    result = runner.invoke(app, ["config", "show", f"{REPO}/configs/{name}.yaml", "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["train"]["epochs"] == 2
    assert resolved["model"]["rpn"]["proposal"]["nms_iou"] == 0.7  # a default filled in by the rpn plugin
    assert resolved["model"]["roi_head"]["type"] == "roi_head"


def test_errors_raised_in_dataloader_workers_keep_their_one_line_message():
    from detkit.cli import user_message
    from detkit.errors import DataError

    text = (
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise DataError(...)\n'
        "detkit.errors.DataError: Annotations/000005.xml: object 2: unknown class 'dog'\n"
    )
    assert user_message(DataError(text)) == "Annotations/000005.xml: object 2: unknown class 'dog'"
    assert user_message(DataError("plain")) == "plain"


def test_list_plugins_load_exits_1_on_a_broken_plugin_and_stays_readable_at_80_columns(fake_site):
    """Issue 9 case 9."""
    from rich.console import Console

    from detkit.plugin_table import plugins_table

    fake_site("fake-broken", "9.9", {"detkit.loss": {"broken_loss": "fake_broken.deeply.nested.module:NopeLoss"}},
              {"fake_broken/__init__.py": "", "fake_broken/deeply/__init__.py": "",
               "fake_broken/deeply/nested/__init__.py": "",
               "fake_broken/deeply/nested/module.py": "raise RuntimeError('boom at import')\n"})
    result = runner.invoke(app, ["list-plugins", "--load", "--kind", "loss"])
    assert result.exit_code == 1, result.output
    assert "loss 'broken_loss' (fake-broken 9.9): failed: RuntimeError: boom at import" in result.output
    assert runner.invoke(app, ["list-plugins", "--kind", "detector"]).exit_code == 0

    rows = [{"kind": "proposal_generator", "name": "broken_loss", "distribution": "fake-broken", "version": "9.9",
             "target": "fake_broken.deeply.nested.module:NopeLoss", "status": "failed: RuntimeError: boom"},
            {"kind": "backbone", "name": "resnet50", "distribution": "detkit", "version": "0.1.0",
             "target": "detkit_builtins.backbones.resnet:ResNet50Backbone", "status": "not loaded"}]
    targets = [r["target"] for r in rows]

    def render(width: int) -> list[str]:
        console = Console(width=width, record=True, color_system=None)
        console.print(plugins_table(rows))
        return console.export_text().splitlines()

    lines = render(80)
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if "kind" in line)
    assert all(h in header.split() for h in ("kind", "name", "status", "distribution"))  # every heading whole
    assert any(line.split() == ["target"] for line in lines)
    assert any(line.split() == ["proposal_generator", "broken_loss", "FAILED", "fake-broken", "9.9"] for line in lines)
    assert any(line.split() == ["backbone", "resnet50", "not", "loaded", "detkit", "0.1.0"] for line in lines)
    for target in targets:  # whole on a line of its own (folded into a column it is cut every few letters)
        assert any(line.strip() == target for line in lines), target
    wide = render(200)  # room for everything: one line per plugin
    assert any("broken_loss" in line and "FAILED" in line and targets[0] in line for line in wide)
    assert any("resnet50" in line and "not loaded" in line and targets[1] in line for line in wide)


def test_list_plugins_at_80_columns_shows_every_target_whole():
    proc = run("list-plugins", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = json.loads(run("list-plugins", "--json").stdout)
    assert len(rows) > 10 and max(len(line) for line in lines) <= 80
    for row in rows:
        assert any(line.split()[:3] == [row["kind"], row["name"], row["status"].split()[0]] for line in lines), row
        assert any(line.strip() == row["target"] for line in lines), row["target"]


def _write_config(tmp_path, backbone: dict) -> Path:
    import yaml

    cfg = {"model": {"type": "faster_rcnn", "backbone": backbone, "rpn": {"type": "rpn", "mid_channels": 8}},
           "data": {"train": {"type": "synthetic", "num_images": 2}},
           "train": {"optimizer": {"type": "sgd", "lr": 0.01}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_validate_checks_the_backbones_real_channels(tmp_path, clean_registry):
    from pydantic import BaseModel, ConfigDict
    from torch import nn

    from detkit.interfaces import Backbone
    from detkit.plugins import Provider
    from detkit.registry import registry

    built = []

    class SaysWide(Backbone):
        """Declares 256 channels at stride 16; its maps have 64."""

        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            channels: int = 64
            pretrained: str | None = None

        out_channels, stride = 256, 16

        def __init__(self, params):
            super().__init__()
            built.append((params.pretrained, torch.empty(1).device.type))  # cleared, and on the meta device
            c = params.channels
            self.body = nn.Sequential(*[nn.Conv2d(3 if i == 0 else c, c, 3, 2, 1) for i in range(4)])

        def forward(self, x):
            return self.body(x)

        def roi_tail(self):
            raise NotImplementedError

    registry("backbone").add("says_wide", SaysWide, provider=Provider("fake-wide", "0.3", "fake_wide:SaysWide"))
    path = _write_config(tmp_path, {"type": "says_wide", "pretrained": "/no/such/weights.pth"})
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("error: model.backbone 'says_wide' (fake-wide 0.3 (fake_wide:SaysWide)) "
                                     "has 64 channels but its out_channels says 256")
    assert built == [(None, "meta")]
    ok = runner.invoke(app, ["config", "validate", str(path), "--set", "model.backbone.channels=256"])
    assert ok.exit_code == 0 and ok.output.strip() == f"{path}: ok", ok.output


@pytest.mark.parametrize("lr, why", [(".inf", "a finite number"), (".nan", "a finite number"),
                                     ("0", "greater than 0"), ("-0.01", "greater than 0")])
def test_config_validate_refuses_impossible_learning_rates(tmp_path, lr, why):
    path = _write_config(tmp_path, {"type": "tiny"})
    result = runner.invoke(app, ["config", "validate", str(path), "--set", f"train.optimizer.lr={lr}"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --set train.optimizer.lr={lr}: train.optimizer.lr: Input should be {why}"


def test_config_validate_names_a_backbone_that_cannot_be_built(tmp_path, clean_registry):
    from pydantic import BaseModel, ConfigDict

    from detkit.plugins import Provider
    from detkit.registry import registry

    class Offline(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def offline(params):
        raise RuntimeError("no network to download the weights")

    registry("backbone").add("offline", offline, Offline, Provider("fake-offline", "1.0", "fake_offline:offline"))
    result = runner.invoke(app, ["config", "validate", str(_write_config(tmp_path, {"type": "offline"}))])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: backbone 'offline' from fake-offline 1.0 (fake_offline:offline) failed "
                                     "while being built: RuntimeError: no network to download the weights")
