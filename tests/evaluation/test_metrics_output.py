"""What the metrics table and log lines say: the per-class metric by name, the images evaluated, and
lines that wrap between metrics, never inside one."""

from __future__ import annotations

import json
import re

import pytest
import torch
from rich.console import Console
from rich.text import Text

from detkit.engine.evaluate import ImageResult, compute_metrics, metrics_table
from detkit.engine.logging import format_train_record
from detkit.sections import EvalConfig

from .test_eval_cli import CONFIG  # a 3-image val set

CLASSES = ["circle", "square"]
FIGURE = re.compile(r"^[A-Za-z0-9_/]+=(-|\d+\.\d+(e[+-]\d+)?)$")  # one metric: key=value


def results(n: int = 3) -> list[ImageResult]:
    """``n`` images, each one circle found (and one false square), so every AP is a number."""
    out = []
    for i in range(n):
        gt = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
        pred = {"boxes": torch.tensor([[11.0, 10.0, 40.0, 41.0], [50.0, 50.0, 60.0, 60.0]]),
                "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([0, 1])}
        target = {"boxes": torch.cat([gt, torch.tensor([[60.0, 5.0, 90.0, 30.0]])]), "labels": torch.tensor([0, 1]),
                  "difficult": torch.zeros(2, dtype=torch.bool)}
        out.append(ImageResult(str(i), pred, target))
    return out


def render(result: dict, width: int, title: str = "val") -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(metrics_table(result, title=title))
    return console.export_text().splitlines()


@pytest.mark.parametrize(
    "metric, headings",
    [
        ([{"type": "voc", "use_07_metric": True}], {"voc": "AP50 (VOC07 11-pt)"}),
        ([{"type": "voc", "iou_thresh": 0.75}, "coco"], {"voc": "AP75 (all-pt)", "coco": "AP@[.5:.95]"}),
    ],
)
def test_each_per_class_column_is_headed_by_its_metric(metric, headings):
    result = compute_metrics(results(), CLASSES, EvalConfig(metric=metric))
    assert result["per_class_metric"] == headings
    assert all(v == v for aps in result["per_class"].values() for v in aps.values())  # numbers, not NaN
    header = next(line for line in render(result, 160) if "class" in line)
    for name, heading in headings.items():
        assert f"{name} {heading}" in header, header


def test_the_title_counts_the_images_evaluated():
    result = compute_metrics(results(3), CLASSES, EvalConfig())
    assert result["images"] == 3
    assert any("val (3 images)" in line for line in render(result, 100))


def test_the_metrics_line_wraps_between_metrics_only():
    result = compute_metrics(results(), CLASSES, EvalConfig(metric=["coco", "voc"]))
    lines = render(result, 50)
    first = next(i for i, line in enumerate(lines) if line.startswith("coco:"))
    last = next(i for i, line in enumerate(lines) if line.startswith("best.pt follows"))
    words = [w for line in lines[first:last] for w in line.split() if w not in ("coco:", "voc:")]
    assert len(words) == len(result["metrics"]) and len(lines[first:last]) > 2  # wrapped, and every metric kept
    assert all(FIGURE.match(w) for w in words), words


def test_the_train_log_line_wraps_between_figures_only():
    record = {"type": "train", "epoch": 0, "step": 3, "rpn_loc": 0.1234, "rpn_cls": 0.5, "roi_loc": 0.25,
              "roi_cls": 1.5, "total": 2.3734, "lr": 0.001, "images_per_s": 12.34, "backbone_frozen": False}
    console = Console(width=30, record=True, color_system=None)
    console.print(Text(format_train_record(record), overflow="fold"))  # as the live display prints it
    lines = console.export_text().splitlines()
    words = [w for line in lines for w in line.split()]
    assert len(lines) > 2 and len(words) == 7 and all(FIGURE.match(w) for w in words), lines
    assert "lr=1.00e-03" in words and "img/s=12.3" in words


def test_detkit_eval_prints_the_real_count_and_writes_the_headings(tmp_path):
    from typer.testing import CliRunner

    from detkit.cli import app
    from detkit.config import validate
    from detkit.engine.checkpoint import save_checkpoint
    from detkit.registry import registry

    cfg = validate(CONFIG).to_dict()
    torch.manual_seed(0)
    model = registry("detector").build(cfg["model"], num_classes=2)
    ckpt = save_checkpoint(tmp_path / "last.pt", model=model.state_dict(), config=cfg, classes=CLASSES)
    out = tmp_path / "ev"
    res = CliRunner().invoke(app, ["eval", str(ckpt), "--set", "eval.max_images=2", "--set", "eval.metric=[voc, coco]",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "(2 images)" in res.output and "(3 images)" not in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["per_class_metric"] == {"voc": "AP50 (all-pt)", "coco": "AP@[.5:.95]"}


def test_the_training_summary_counts_the_images_evaluated(tmp_path, tiny_dict, capsys):
    from detkit.api import train

    tiny_dict["train"].update(epochs=1, max_iters_per_epoch=1)
    tiny_dict["eval"]["max_images"] = 2  # of the 4 in data.val
    train(tiny_dict, out_dir=tmp_path / "run")
    out = capsys.readouterr().out
    assert "val (2 images)" in out and "4 images" not in out, out
