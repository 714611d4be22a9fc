"""Issue 9 case 1: boxes outside the image are clipped, empty ones dropped, both counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from detkit.cli import app
from detkit.data.box_report import BoxReport, find_box_report
from detkit.data.coco import COCODataset
from detkit.data.voc import VOCDataset
from detkit.errors import DataError

VOC_XML = """<annotation><filename>a1.png</filename>
<size><width>20</width><height>10</height><depth>3</depth></size>{objects}</annotation>"""
OBJ = ("<object><name>dog</name><difficult>0</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin>"
       "<xmax>{}</xmax><ymax>{}</ymax></bndbox></object>")


def test_clip_counts_clipped_and_wholly_outside_boxes():
    report = BoxReport()
    boxes = np.array([[1, 1, 5, 5], [-3, 2, 8, 12], [25, 1, 30, 5], [-9, -9, -1, -1]], dtype=np.float32)
    out, keep = report.clip(boxes, (10, 20))
    assert keep.tolist() == [True, True, False, False]
    assert out[keep].tolist() == [[1, 1, 5, 5], [0, 2, 8, 10]]
    assert (report.kept, report.clipped, report.outside, report.empty) == (2, 1, 2, 0)
    assert report.line("data.train") == (
        "data.train: 2 boxes kept; 1 clipped to their image, 2 dropped (wholly outside their image)"
    )
    assert BoxReport(kept=3).line("data.val") == "data.val: 3 boxes, all inside their images"


def test_voc_boxes_outside_the_image_are_clipped_or_dropped(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("a1\n")
    objects = [OBJ.format(1, 2, 10, 8),  # inside
               OBJ.format(15, 5, 40, 30),  # partly outside: clipped to 20 x 10
               OBJ.format(-5, -5, 4, 4),  # negative corner: clipped to 0
               OBJ.format(30, 12, 40, 20)]  # wholly outside: dropped
    (tmp_path / "Annotations" / "a1.xml").write_text(VOC_XML.format(objects="".join(objects)))
    Image.new("RGB", (20, 10)).save(tmp_path / "JPEGImages" / "a1.png")
    ds = VOCDataset(VOCDataset.Params(root=str(tmp_path), split="train", classes=["dog"]))
    _, t = ds.annotation(0)
    assert t["boxes"].tolist() == [[0, 1, 10, 8], [14, 4, 20, 10], [0, 0, 4, 4]]
    assert t["labels"].tolist() == [0, 0, 0] and t["difficult"].tolist() == [False] * 3
    assert ds.box_report.to_dict() == {"kept": 3, "clipped": 2, "outside": 1, "empty": 0, "dropped": 1,
                                       "size_mismatch": 0}


def _coco(tmp_path, sized=True):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    image = {"id": 1, "file_name": "a.png", **({"height": 10, "width": 20} if sized else {})}
    anns = [[1, 1, 4, 4], [15, 5, 10, 10], [-2, 0, 4, 4], [40, 40, 5, 5], [3, 3, 0, 4], [3, 3, 4, -1]]
    data = {"images": [image], "categories": [{"id": 1, "name": "dog"}],
            "annotations": [{"id": k, "image_id": 1, "category_id": 1, "bbox": b} for k, b in enumerate(anns)]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return COCODataset(COCODataset.Params(root=str(tmp_path), annotations=str(path)))


def test_coco_boxes_are_clipped_and_zero_size_ones_counted(tmp_path):
    for sized in (True, False):  # the size from the JSON, else from the image header
        ds = _coco(tmp_path, sized)
        assert ds.annotation(0)[1]["boxes"].tolist() == [[1, 1, 5, 5], [15, 5, 20, 10], [0, 0, 2, 4]]
        assert ds.box_report.to_dict() == {"kept": 3, "clipped": 2, "outside": 1, "empty": 2, "dropped": 3,
                                           "size_mismatch": 0}
        assert "2 dropped (zero or negative width or height)" in ds.box_report.line("data.train")


def test_data_stats_prints_the_summary_and_ignores_degenerate_boxes(tmp_path):
    _coco(tmp_path)
    cfg = {
        "model": {
            "type": "faster_rcnn",
            "backbone": {"type": "tiny", "channels": [8, 8, 8, 8], "tail_features": 16},
            "rpn": {"type": "rpn", "mid_channels": 8, "anchor": {"scales": [1.0, 2.0], "ratios": [1.0]}},
            "preprocess": {"min_size": 64, "max_size": 128},
        },
        "data": {"train": {"type": "coco", "root": str(tmp_path), "annotations": str(tmp_path / "instances.json")}},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["data", "stats", str(path)])
    assert res.exit_code == 0, res.output
    assert "data.train: 3 boxes kept; 2 clipped to their image, 1 dropped (wholly outside" in res.output

    from detkit.config import load_config
    from detkit.data.stats import dataset_stats

    report = dataset_stats(load_config(path))
    # Without clipping the wholly-outside box became zero-area and pulled a scale towards 0.
    assert min(report.suggested["scales"]) > 0.1


def test_find_box_report_looks_through_wrappers():
    class Wrapper:
        def __init__(self, dataset):
            self.dataset = dataset

    class Inner:
        box_report = BoxReport(kept=1)

    assert find_box_report(Wrapper(Wrapper(Inner()))) is Inner.box_report
    assert find_box_report(Wrapper(object())) is None


def test_degenerate_boxes_never_reach_the_anchor_suggestion():
    import torch

    from detkit.data.stats import Annotations, suggest_anchors, without_degenerate_boxes

    boxes = torch.tensor([[0.0, 0, 32, 32], [10, 10, 42, 42], [20, 20, 20, 20], [64, 5, 64, 30]])
    ann = Annotations(classes=["a"], sizes=torch.tensor([[64, 64]]), boxes=boxes, labels=torch.zeros(4, dtype=torch.long),
                      image_index=torch.zeros(4, dtype=torch.long), difficult=torch.zeros(4, dtype=torch.bool))
    clean = without_degenerate_boxes(ann)
    assert clean.boxes.tolist() == boxes[:2].tolist() and clean.labels.shape == (2,)
    assert suggest_anchors(clean.boxes, 2, 1)[0] == [2.0]  # 32 px / 16, not 6e-05


def test_training_prints_the_summary_and_keeps_it_in_the_run_directory(tmp_path, capsys, tiny_dict, write_tiny):
    from detkit.config import load_config
    from detkit.engine.train import train

    _coco(tmp_path)
    coco = {"type": "coco", "root": str(tmp_path), "annotations": str(tmp_path / "instances.json")}
    tiny_dict["data"].update(train=coco, val=coco, batch_size=1)
    tiny_dict["train"]["epochs"] = 1
    tiny_dict["eval"] = {"interval": 0}
    path = write_tiny(tiny_dict)
    run_dir = train(load_config(path), out_dir=tmp_path / "run")
    line = "data.train: 3 boxes kept; 2 clipped to their image, 1 dropped (wholly outside their image), " \
           "2 dropped (zero or negative width or height)"
    assert line in capsys.readouterr().out
    assert (run_dir / "data_summary.txt").read_text().splitlines()[0] == line


# ------------------------------------------------ the file wins over its annotation
def _voc(root, files: dict[str, tuple[str, str]]):
    """``files``: id -> (XML objects, image file name); the XML claims 20 x 10."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, (objects, name) in files.items():
        xml = VOC_XML.replace("a1.png", name).format(objects=objects)
        (root / "Annotations" / f"{i}.xml").write_text(xml)
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(files) + "\n")
    return root


def test_voc_real_image_size_wins_and_mismatches_are_counted(tmp_path):
    root = _voc(tmp_path, {
        "big": (OBJ.format(26, 12, 35, 20) + OBJ.format(30, 25, 50, 45), "big.png"),  # XML says 20x10, image 40x30
        "ok": (OBJ.format(1, 1, 5, 5), "ok.png"),
        "turned": (OBJ.format(1, 1, 8, 15), "turned.png"),  # 10x20: the XML's sides swapped
    })
    Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "big.png")
    Image.new("RGB", (20, 10)).save(root / "JPEGImages" / "ok.png")
    Image.new("RGB", (10, 20)).save(root / "JPEGImages" / "turned.png")
    ds = VOCDataset(VOCDataset.Params(root=str(root), split="train", classes=["dog"]))
    size, t = ds.annotation(0)
    assert size == (30, 40)
    # kept (not "wholly outside" the claimed 20 x 10), and clipped to the real 40 x 30
    assert t["boxes"].tolist() == [[25, 11, 35, 20], [29, 24, 40, 30]]
    size, t = ds.annotation(2)
    assert size == (20, 10) and t["boxes"].tolist() == [[0, 0, 8, 15]]  # not clipped to the XML's height 10
    report = ds.box_report
    assert (report.kept, report.clipped, report.outside, report.size_mismatch) == (4, 1, 0, 2)
    line = report.line("data.train")
    assert "2 files' annotated size differs from the image, whose size is used" in line
    assert f"first: {root / 'Annotations' / 'big.xml'}: annotated 20x10, image 40x30)" in line
    assert BoxReport(kept=1, size_mismatch=1, first_mismatch="x").line("d").endswith(
        "; 1 file's annotated size differs from the image, whose size is used (first: x)")
    swapped = BoxReport()
    swapped.real_size("t.xml", (10, 20), (20, 10))
    assert swapped.first_mismatch == "t.xml: annotated 20x10, image 10x20 (sides swapped: EXIF orientation?)"


def test_voc_exif_rotated_image_is_sized_as_shown(tmp_path):
    root = _voc(tmp_path, {"r": (OBJ.format(1, 1, 8, 18), "r.jpg")})
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 20 x 10, shown 10 x 20
    Image.new("RGB", (10, 20)).transpose(Image.Transpose.ROTATE_90).save(root / "JPEGImages" / "r.jpg", exif=exif.tobytes())
    ds = VOCDataset(VOCDataset.Params(root=str(root), split="train", classes=["dog"]))
    assert ds.annotation(0)[0] == (20, 10) == tuple(ds[0][0].shape[1:])
    # the XML claims 20x10 (w x h) for the shown 10x20: counted, the shown size used
    assert ds.box_report.size_mismatch == 1 and ds.annotation(0)[1]["boxes"].tolist() == [[0, 0, 8, 18]]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_voc_non_finite_coordinates_are_refused_naming_file_and_object(tmp_path, value):
    root = _voc(tmp_path, {"a1": (OBJ.format(1, 1, 5, 5) + OBJ.format(2, 2, value, 8), "a1.png")})
    Image.new("RGB", (20, 10)).save(root / "JPEGImages" / "a1.png")
    with pytest.raises(DataError) as info:
        VOCDataset(VOCDataset.Params(root=str(root), split="train", classes=["dog"]))
    msg = str(info.value)
    assert msg == f"{root / 'Annotations' / 'a1.xml'}: object[1].bndbox.xmax: not a finite number: {value!r}"


def _coco_file(tmp_path, bbox, size=(10, 20)):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    data = {"images": [{"id": 7, "file_name": "a.png", "height": size[0], "width": size[1]}],
            "categories": [{"id": 1, "name": "dog"}],
            "annotations": [{"id": 0, "image_id": 7, "category_id": 1, "bbox": [1, 1, 4, 4]},
                            {"id": 1, "image_id": 7, "category_id": 1, "bbox": bbox}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))  # json writes NaN and Infinity, and reads them back
    return path


def test_coco_real_image_size_wins_and_mismatches_are_counted(tmp_path):
    path = _coco_file(tmp_path, [25, 12, 20, 30])  # outside the claimed 20 x 10, inside the real 40 x 30
    ds = COCODataset(COCODataset.Params(root=str(tmp_path), annotations=str(path)))
    size, t = ds.annotation(0)
    assert size == (30, 40) and t["boxes"].tolist() == [[1, 1, 5, 5], [25, 12, 40, 30]]
    assert ds.box_report.to_dict() == {"kept": 2, "clipped": 1, "outside": 0, "empty": 0, "dropped": 0,
                                       "size_mismatch": 1}
    assert ds.box_report.first_mismatch == f"{path}: images id 7 (a.png): annotated 20x10, image 40x30"
    same = COCODataset(COCODataset.Params(root=str(tmp_path), annotations=str(_coco_file(tmp_path, [1, 1, 2, 2], size=(30, 40)))))
    assert same.box_report.size_mismatch == 0 and "differs" not in same.box_report.line("data.train")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_coco_non_finite_box_is_refused_naming_file_and_object(tmp_path, bad):
    path = _coco_file(tmp_path, [2, 2, bad, 3])
    with pytest.raises(DataError) as info:
        COCODataset(COCODataset.Params(root=str(tmp_path), annotations=str(path)))
    msg = str(info.value)
    assert msg.startswith(f"{path}: annotations[1].bbox: not finite: ") and "'a.png'" in msg and "\n" not in msg
