"""VOC and COCO readers, on files written by `detkit data synth` and on hand-broken files."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from detkit.cli import app
from detkit.data.coco import COCODataset
from detkit.data.export import export_synthetic
from detkit.data.synthetic import SyntheticShapes
from detkit.data.voc import VOCDataset
from detkit.errors import DataError
from detkit.registry import registry

runner = CliRunner()


# Built as the registry builds them: each from its validated Params.
def shapes(**params) -> SyntheticShapes:
    return SyntheticShapes(SyntheticShapes.Params(**params))


def voc(**params) -> VOCDataset:
    return VOCDataset(VOCDataset.Params(**params))


def coco(**params) -> COCODataset:
    return COCODataset(COCODataset.Params(**params))

VOC_XML = """<annotation>
  <filename>{fn}</filename>
  <size><width>20</width><height>10</height><depth>3</depth></size>
  {objects}
</annotation>"""
OBJ = "<object><name>{name}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"


def _same_as_synthetic(ds, synth):
    assert len(ds) == len(synth)
    for i in range(len(synth)):
        a, ta = synth[i]
        b, tb = ds[i]
        assert torch.equal(ta["boxes"], tb["boxes"])
        assert torch.equal(ta["labels"], tb["labels"])
        assert not tb["difficult"].any()
        # PNG stores 8 bits: at most half a step of rounding.
        assert (a - b).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_cli_synth_roundtrip(tmp_path, fmt):
    out = tmp_path / fmt
    res = runner.invoke(app, ["data", "synth", str(out), "--format", fmt, "-n", "3", "--seed", "2",
                              "--split", "val", "--image-size", "64", "--classes", "ring,diamond,circle"])
    assert res.exit_code == 0, res.output
    synth = shapes(num_images=3, seed=2, split="val", image_size=(64, 64),
                            classes=["ring", "diamond", "circle"])
    if fmt == "voc":
        ds = registry("dataset").build({"type": "voc", "root": str(out), "split": "val",
                                        "classes": ["ring", "diamond", "circle"]})
        assert ds.ids == ["val_000000", "val_000001", "val_000002"]
    else:
        ds = registry("dataset").build({"type": "coco", "root": str(out / "images"),
                                        "annotations": str(out / "annotations" / "instances_val.json")})
        assert ds.classes == ["ring", "diamond", "circle"]
    _same_as_synthetic(ds, synth)
    size, t = ds.annotation(1)
    assert size == (64, 64) and torch.equal(t["boxes"], synth[1][1]["boxes"])


def test_cli_synth_rejects_bad_options(tmp_path):
    res = runner.invoke(app, ["data", "synth", str(tmp_path), "--format", "yolo", "-n", "1"])
    assert res.exit_code == 1 and "--format" in res.output and "yolo" in res.output
    res = runner.invoke(app, ["data", "synth", str(tmp_path), "--classes", "circle,blob", "-n", "1"])
    assert res.exit_code == 2 and "blob" in res.output


def test_jpeg_export_is_close(tmp_path):
    synth = shapes(num_images=1, image_size=(48, 48), object_size=(12, 20), noise=0.0)
    export_synthetic(tmp_path, "voc", synth, image_format="jpg")
    ds = voc(root=str(tmp_path), split="train", classes=synth.classes)
    assert ds.image_path(0).name == "train_000000.jpg"
    assert (ds[0][0] - synth[0][0]).abs().mean() < 0.02


def _voc_tree(root, objects, name="a1", split="train", fn="a1.png"):
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text(f"{name}\n")
    xml = root / "Annotations" / f"{name}.xml"
    xml.write_text(VOC_XML.format(fn=fn, objects="".join(objects)))
    return xml


def test_voc_boxes_are_zero_based_and_difficult_flagged(tmp_path):
    _voc_tree(tmp_path, [OBJ.format(name="dog", d=0, x1=1, y1=2, x2=10, y2=8),
                         OBJ.format(name="cat", d=1, x1=5, y1=5, x2=20, y2=10)])
    from PIL import Image

    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "JPEGImages" / "a1.png")
    kept = voc(root=str(tmp_path), split="train", use_difficult=True)
    img, t = kept[0]
    assert img.shape == (3, 10, 20) and torch.allclose(img[0], torch.ones(10, 20)) and img[1:].abs().max() == 0
    assert t["boxes"].tolist() == [[0.0, 1.0, 10.0, 8.0], [4.0, 4.0, 20.0, 10.0]]
    assert t["labels"].tolist() == [11, 7]  # dog, cat in the VOC order
    assert t["difficult"].tolist() == [False, True]
    dropped = voc(root=str(tmp_path), split="train")
    assert dropped[0][1]["labels"].tolist() == [11]


@pytest.mark.parametrize(
    "objects, field",
    [
        ([OBJ.format(name="unicorn", d=0, x1=1, y1=1, x2=5, y2=5)], "object[0].name: unknown class 'unicorn'"),
        ([OBJ.format(name="dog", d=0, x1=1, y1=1, x2=5, y2=5), OBJ.format(name="dog", d=0, x1="a", y1=1, x2=5, y2=5)],
         "object[1].bndbox.xmin: not a number"),
        ([OBJ.format(name="dog", d=0, x1=9, y1=1, x2=5, y2=5)], "object[0].bndbox: empty box"),
        (["<object><name>dog</name></object>"], "object[0].bndbox: missing"),
        (["<object><name>dog</name"], "invalid XML"),
    ],
)
def test_voc_bad_annotation_names_file_and_field(tmp_path, objects, field):
    xml = _voc_tree(tmp_path, objects)
    with pytest.raises(DataError) as err:
        voc(root=str(tmp_path), split="train")
    msg = str(err.value)
    assert msg.startswith(f"{xml}: ") and field in msg and "\n" not in msg


def test_voc_ignore_other_classes(tmp_path):
    _voc_tree(tmp_path, [OBJ.format(name="unicorn", d=0, x1=1, y1=1, x2=5, y2=5),
                         OBJ.format(name="dog", d=0, x1=1, y1=1, x2=5, y2=5)])
    ds = voc(root=str(tmp_path), split="train", classes=["dog"], ignore_other_classes=True)
    assert ds.annotation(0)[1]["labels"].tolist() == [0]


def test_voc_missing_root_and_split_explain_themselves(tmp_path):
    with pytest.raises(DataError) as err:
        voc(root=str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "Annotations") in msg and "VOCtrainval_06-Nov-2007.tar" in msg
    _voc_tree(tmp_path, [])
    with pytest.raises(DataError, match="test.txt: split file not found.*available splits: train"):
        voc(root=str(tmp_path), split="test")


def test_voc_missing_image_names_file(tmp_path):
    _voc_tree(tmp_path, [], fn="")
    ds = voc(root=str(tmp_path), split="train")
    with pytest.raises(DataError, match=r"JPEGImages/a1\.jpg: image file not found"):
        ds[0]


def _coco(tmp_path, **changes):
    data = {
        "images": [{"id": 7, "file_name": "b.png", "height": 10, "width": 20},
                   {"id": 3, "file_name": "a.png", "height": 10, "width": 20}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [1, 2, 3, 4], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 4, "bbox": [0, 0, 10, 5], "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 4, "bbox": [5, 5, 0, 2], "iscrowd": 0},
        ],
        "categories": [{"id": 9, "name": "zebra"}, {"id": 4, "name": "ant"}],
    }
    data.update(changes)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_maps_categories_and_crowds(tmp_path):
    path = _coco(tmp_path)
    ds = coco(root=str(tmp_path), annotations=str(path), use_crowd=True)
    assert ds.classes == ["ant", "zebra"]  # sorted by category id: 4, 9
    assert len(ds) == 2  # the image without annotations stays
    size, t = ds.annotation(0)
    assert size == (10, 20) and t["image_id"] == "3" and t["boxes"].shape == (0, 4)
    _, t = ds.annotation(1)
    assert t["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0], [0.0, 0.0, 10.0, 5.0]]  # the empty box is skipped
    assert t["labels"].tolist() == [1, 0] and t["difficult"].tolist() == [False, True]
    no_crowd = coco(root=str(tmp_path), annotations=str(path))
    assert no_crowd.annotation(1)[1]["labels"].tolist() == [1]


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [1, 2, 3, 4]}]},
         "annotations[0].category_id: unknown category id 5"),
        ({"annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 2, 3, 4]}]},
         "annotations[0].image_id: unknown image id 1"),
        ({"annotations": [{"id": 1, "image_id": 7, "category_id": 9, "bbox": [1, 2, 3]}]}, "annotations[0].bbox"),
        ({"categories": [{"id": 9}]}, "categories[0].name"),
        ({"images": None}, "images: missing or not a list"),
    ],
)
def test_coco_bad_annotation_names_file_and_field(tmp_path, changes, field):
    path = _coco(tmp_path, **changes)
    with pytest.raises(DataError) as err:
        coco(root=str(tmp_path), annotations=str(path))
    assert str(err.value).startswith(f"{path}: ") and field in str(err.value)


def test_coco_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 1"):
        coco(root=str(tmp_path), annotations=str(bad))
    with pytest.raises(DataError, match=r"nope\.json: COCO annotation file not found"):
        coco(root=str(tmp_path), annotations=str(tmp_path / "nope.json"))
