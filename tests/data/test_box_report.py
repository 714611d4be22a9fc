"""Issue 9 case 1: boxes outside the image are clipped, empty ones dropped, both counted."""

from __future__ import annotations

import json

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from detkit.cli import app
from detkit.data.box_report import BoxReport, find_box_report
from detkit.data.coco import COCODataset
from detkit.data.voc import VOCDataset

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
    assert ds.box_report.to_dict() == {"kept": 3, "clipped": 2, "outside": 1, "empty": 0, "dropped": 1}


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
        assert ds.box_report.to_dict() == {"kept": 3, "clipped": 2, "outside": 1, "empty": 2, "dropped": 3}
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
