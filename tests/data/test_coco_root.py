"""The COCO ``root`` may be the image folder or the folder ``detkit data synth --format coco`` writes;
``config validate`` and ``data stats`` refuse a root where the first annotated images are not, in one line
naming the field to change."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from detkit.cli import app
from detkit.data.coco import COCODataset
from detkit.data.export import export_synthetic
from detkit.data.synthetic import SyntheticShapes

runner = CliRunner()


def _synth(out, split: str, fmt: str = "coco"):
    data = SyntheticShapes(SyntheticShapes.Params(num_images=4, image_size=(64, 64), object_size=(16, 32), split=split))
    return export_synthetic(out, fmt, data), data


@pytest.fixture
def coco(tmp_path):
    """``(folder synth wrote, train instances, val instances, the synthetic train set)``."""
    train, data = _synth(tmp_path / "coco", "train")
    val, _ = _synth(tmp_path / "coco", "val")
    return tmp_path / "coco", train, val, data


@pytest.mark.parametrize("layout", ["synth folder", "image folder"])
def test_root_may_be_the_synth_folder_or_its_image_folder(coco, layout):
    folder, train, _, synthetic = coco
    root = folder if layout == "synth folder" else folder / "images"
    ds = COCODataset(COCODataset.Params(root=str(root), annotations=str(train)))
    assert ds.root == folder / "images" and all(p.is_file() for p in ds.first_image_paths())
    image, target = ds[0]
    expected, truth = synthetic[0]
    assert torch.equal(image, (expected.clamp(0, 1) * 255).round() / 255)  # the very pixels synth wrote
    assert torch.equal(target["boxes"], truth["boxes"].float()) and len(target["boxes"]) > 0


def _config(write_tiny, tiny_dict, train: dict, val: dict | None):
    tiny_dict["data"]["train"], tiny_dict["data"]["val"] = train, val
    return write_tiny(tiny_dict)


def test_config_validate_and_data_stats_accept_both_layouts(coco, tiny_dict, write_tiny):
    folder, train, val, _ = coco
    config = _config(write_tiny, tiny_dict, {"type": "coco", "root": str(folder), "annotations": str(train)},
                     {"type": "coco", "root": str(folder / "images"), "annotations": str(val)})
    ok = runner.invoke(app, ["config", "validate", str(config)])
    assert ok.exit_code == 0 and ok.output.strip() == f"{config}: ok", ok.output
    stats = runner.invoke(app, ["data", "stats", str(config)])
    assert stats.exit_code == 0, stats.output


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("command", [["config", "validate"], ["data", "stats"]], ids=["validate", "stats"])
def test_a_root_without_the_images_is_one_line_naming_the_field(coco, tiny_dict, write_tiny, split, command):
    folder, train, val, _ = coco
    wrong = folder / "annotations"  # a folder, but not the one the images are in
    specs = {"train": {"type": "coco", "root": str(folder), "annotations": str(train)},
             "val": {"type": "coco", "root": str(folder), "annotations": str(val)}}
    specs[split]["root"] = str(wrong)
    config = _config(write_tiny, tiny_dict, specs["train"], specs["val"])
    result = runner.invoke(app, [*command, str(config)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {config}: data.{split}.root: image not found: {wrong / split}_0000")
    assert f"set data.{split}.root to the folder the images' file_name is relative to, or one holding it as images/" \
        in lines[0] and f"(it reads {wrong})" in lines[0]


def test_voc_images_missing_is_one_line_naming_the_field(tmp_path, tiny_dict, write_tiny):
    root, _ = _synth(tmp_path / "voc", "train", "voc")
    for image in (root / "JPEGImages").iterdir():
        image.unlink()
    config = _config(write_tiny, tiny_dict, {"type": "voc", "root": str(root), "split": "train",
                                             "classes": ["circle", "square", "triangle", "cross"]}, None)
    result = runner.invoke(app, ["config", "validate", str(config)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().startswith(f"error: {config}: data.train.root: image not found: {root / 'JPEGImages'}")
    assert "(nor the next 2 annotated images)" in result.output


def test_one_missing_image_is_no_root_problem(tmp_path, tiny_dict, write_tiny):
    # A root that holds the other images is right; the missing file is listed by data stats --check-images.
    root, _ = _synth(tmp_path / "voc", "train", "voc")
    sorted((root / "JPEGImages").iterdir())[0].unlink()
    config = _config(write_tiny, tiny_dict, {"type": "voc", "root": str(root), "split": "train",
                                             "classes": ["circle", "square", "triangle", "cross"]}, None)
    result = runner.invoke(app, ["config", "validate", str(config)])
    assert result.exit_code == 0, result.output


def test_train_refuses_a_wrong_root_before_writing_anything(coco, tiny_dict, write_tiny, tmp_path):
    folder, train, val, _ = coco
    config = _config(write_tiny, tiny_dict, {"type": "coco", "root": str(folder / "annotations"),
                                             "annotations": str(train)}, None)
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert result.output.strip().startswith("error: data.train.root: image not found:"), result.output
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing
