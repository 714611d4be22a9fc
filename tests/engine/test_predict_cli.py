"""``detkit predict`` and ``detkit import-weights`` on the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from detkit.cli import app

runner = CliRunner()

def test_predict_writes_one_json_per_image(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", ["a", "b"], confident=True)
    img = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(img)
    grey = tmp_path / "sub" / "photo.png"
    grey.parent.mkdir()
    Image.fromarray(np.zeros((30, 40), dtype=np.uint8)).save(grey)
    result = runner.invoke(app, ["predict", str(ckpt), str(img), str(grey), "--out", str(tmp_path / "out"),
                                 "--nms-iou", "0.5"])
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "out" / "photo.json").read_text())
    second = json.loads((tmp_path / "out" / "photo_1.json").read_text())  # same stem: not overwritten
    assert (first["width"], first["height"]) == (80, 48) and (second["width"], second["height"]) == (40, 30)
    assert len(first["detections"]) > 0
    for d in first["detections"]:
        assert d["label"] == 1 and d["name"] == "b" and d["score"] > 0.99
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= 80 and 0 <= y1 < y2 <= 48


def test_predict_errors_are_one_line(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", ["a", "b"], confident=False)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    result = runner.invoke(app, ["predict", str(ckpt), str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert f"error: {bad}: cannot read image" in result.output
    result = runner.invoke(app, ["predict", str(tmp_path / "none.pt"), str(bad)])
    assert result.exit_code == 2 and "checkpoint not found" in result.output  # an input error


def test_import_weights_command_errors(tmp_path):
    src = tmp_path / "w.pth"
    torch.save({"rpn.conv1.weight": torch.zeros(1)}, src)
    classes = tmp_path / "c.txt"
    classes.write_text("x\n")
    result = runner.invoke(app, ["import-weights", str(src), str(tmp_path / "o.pt"), "--backbone", "vgg16",
                                 "--classes", str(classes)])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "missing keys" in line and "wrong shapes: rpn.conv1.weight" in line
    result = runner.invoke(app, ["import-weights", str(src), str(tmp_path / "o.pt"), "--backbone", "vgg19",
                                 "--classes", str(classes)])
    assert result.exit_code == 2 and "vgg16, resnet50" in result.output


def test_predict_draw_writes_an_annotated_png_beside_the_json(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", ["a", "b"], confident=True)
    pixels = np.full((48, 80, 3), 128, dtype=np.uint8)
    img = tmp_path / "photo.png"
    Image.fromarray(pixels).save(img)
    out = tmp_path  # the input's own folder: the drawing must not overwrite photo.png
    result = runner.invoke(app, ["predict", str(ckpt), str(img), "--out", str(out), "--draw"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(img)), pixels)
    drawn = np.asarray(Image.open(out / "photo.detections.png").convert("RGB"))
    assert drawn.shape == pixels.shape
    assert json.loads((out / "photo.json").read_text())["detections"]
    assert (drawn != pixels).any(), "boxes were drawn"


def test_predict_takes_folders_of_images(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", ["a", "b"], confident=True)
    folder = tmp_path / "shots"
    folder.mkdir()
    for name in ("b.png", "a.jpg"):
        Image.fromarray(np.full((40, 56, 3), 90, dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    result = runner.invoke(app, ["predict", str(ckpt), str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.json", "b.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["predict", str(ckpt), str(empty)])
    assert result.exit_code == 1 and "folder holds no images" in result.output


def test_predict_skips_an_unreadable_file_and_goes_on(tmp_path, tiny_checkpoint):
    """Issue 9 case 8: one bad file in a folder no longer stops the run half-way."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt", ["a", "b"], confident=True)
    folder = tmp_path / "shots"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        Image.fromarray(np.full((40, 56, 3), 90, dtype=np.uint8)).save(folder / name)
    (folder / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    for batch in ("1", "2"):
        out = tmp_path / f"out{batch}"
        result = runner.invoke(app, ["predict", str(ckpt), str(folder), "--out", str(out), "--batch-size", batch])
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in out.iterdir()) == ["a.json", "c.json"]
        warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and f"{folder / 'b.jpg'}: cannot read image" in warnings[0]
        assert "2 images" in result.output and "(1 unreadable skipped)" in result.output
    strict = runner.invoke(app, ["predict", str(ckpt), str(folder), "--out", str(tmp_path / "s"), "--strict"])
    assert strict.exit_code == 1
    assert "error: 1 of 3 images could not be read (--strict); first: " in strict.output
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["a.json", "c.json"]  # the good ones written
    (folder / "a.png").write_bytes(b"")
    (folder / "c.png").write_bytes(b"broken")
    none = runner.invoke(app, ["predict", str(ckpt), str(folder), "--out", str(tmp_path / "n")])
    assert none.exit_code == 1 and "3 of 3 images could not be read (nothing could be read)" in none.output


def test_predict_max_detections_caps_every_json(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "m.pt", ["a", "b"], confident=True)
    rng = np.random.default_rng(1)
    for name, shape in (("one.png", (48, 80, 3)), ("two.png", (64, 64, 3)), ("three.png", (48, 80, 3))):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / name)
    images = [str(tmp_path / n) for n in ("one.png", "two.png", "three.png")]
    full = runner.invoke(app, ["predict", str(ckpt), *images, "--out", str(tmp_path / "full"), "--batch-size", "1"])
    capped = runner.invoke(app, ["predict", str(ckpt), *images, "--out", str(tmp_path / "cap"), "--max-detections", "2"])
    assert full.exit_code == 0 and capped.exit_code == 0, full.output + capped.output
    for stem in ("one", "two", "three"):
        all_dets = json.loads((tmp_path / "full" / f"{stem}.json").read_text())["detections"]
        top = json.loads((tmp_path / "cap" / f"{stem}.json").read_text())["detections"]
        assert len(all_dets) > 2 and len(top) == 2, stem  # batched (the default) and capped: the best two
        for t, d in zip(top, all_dets):
            assert t["label"] == d["label"] and t["box"] == pytest.approx(d["box"], abs=1e-3), stem
            assert t["score"] == pytest.approx(d["score"], abs=1e-4), stem
    bad = runner.invoke(app, ["predict", str(ckpt), images[0], "--out", str(tmp_path / "bad"), "--max-detections", "0"])
    assert bad.exit_code == 2 and "--max-detections" in bad.output
