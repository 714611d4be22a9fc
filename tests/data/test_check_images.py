"""Issue 9 case 10: `data stats --check-images` decodes every image; an empty split is an error."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from detkit.cli import app

runner = CliRunner()
MODEL = {
    "type": "faster_rcnn",
    "backbone": {"type": "tiny", "channels": [8, 8, 8, 8], "tail_features": 16},
    "rpn": {"type": "rpn", "mid_channels": 8, "anchor": {"scales": [1.0, 2.0], "ratios": [1.0]}},
    "preprocess": {"min_size": 64, "max_size": 64},
}


def _voc(tmp_path):
    root = tmp_path / "voc"
    res = runner.invoke(app, ["data", "synth", str(root), "-n", "3", "--image-size", "64", "--classes", "circle,square"])
    assert res.exit_code == 0, res.output
    cfg = {"model": MODEL,
           "data": {"train": {"type": "voc", "root": str(root), "split": "train", "classes": ["circle", "square"]}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


def test_check_images_lists_unreadable_files_and_exits_1(tmp_path):
    root, cfg = _voc(tmp_path)
    ok = runner.invoke(app, ["data", "stats", str(cfg), "--check-images"])
    assert ok.exit_code == 0, ok.output
    assert "data.train: 3 of 3 images decode" in ok.output
    images = sorted((root / "JPEGImages").iterdir())
    images[1].write_bytes(images[1].read_bytes()[:40])  # truncated
    images[2].unlink()  # missing
    plain = runner.invoke(app, ["data", "stats", str(cfg)])
    assert plain.exit_code == 0, plain.output  # without the check nothing opens the images
    bad = runner.invoke(app, ["data", "stats", str(cfg), "--check-images"])
    assert bad.exit_code == 1
    assert "data.train: 1 of 3 images decode" in bad.output
    assert f"unreadable: {images[1]}: cannot read image" in bad.output
    assert any(line.strip().startswith(f"unreadable: {root / 'JPEGImages' / images[2].stem}")
               and "image file not found" in line for line in bad.output.splitlines())
    assert "error: 2 image(s) cannot be read" in bad.output


def test_an_empty_split_exits_1(tmp_path):
    root, cfg = _voc(tmp_path)
    (root / "ImageSets" / "Main" / "train.txt").write_text("")
    for extra in ([], ["--check-images"]):
        res = runner.invoke(app, ["data", "stats", str(cfg), *extra])
        assert res.exit_code == 1, res.output
        assert "data.train is empty (0 images)" in res.output
