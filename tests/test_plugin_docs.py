"""The examples of docs/plugins.md run, and the plugins they define do what the page says.

Each ```python block is executed as written, in order, in one module (```py
marks a fragment that is not run).  The classes it defines are then registered
for this process under the entry-point names of the page's section 2 and used:
built into detectors that train a step and detect, fed to the loader, to the
evaluation and to a short training run.  Every ```yaml fragment is merged into
the tiny test config and validated.  A contract class the page defines but no
test uses fails the suite, so a new example needs a check here.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import types
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import yaml

from detkit.errors import ConfigError, DataError
from detkit.evaluation.base import Evaluator
from detkit.interfaces import (
    Backbone, BoxLoss, ClassificationLoss, DetectionDataset, Hook, Neck, RoIHead, TargetCreator, Transform,
)
from detkit.registry import ComponentValidationError, registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"

# (kind, name in section 2, class): what each example is registered as here.
PLUGINS = [
    ("backbone", "small_net", "SmallNet"),
    ("backbone", "two_level", "TwoLevelNet"),
    ("backbone", "mobilenet_v3_small", "MobileNetV3Small"),
    ("neck", "lateral", "LateralNeck"),
    ("roi_head", "mean_pool", "MeanPoolRoIHead"),
    ("loss", "softmax_focal", "SoftmaxFocalLoss"),
    ("loss", "iou", "IoULoss"),
    ("target_creator", "iou_anchor", "IoUAnchorTarget"),
    ("target_creator", "iou_proposal", "IoUProposalTarget"),
    ("hook", "loss_csv", "LossCSV"),
    ("evaluator", "f1", "F1Evaluator"),
    ("transform", "vflip", "VerticalFlip"),
    ("dataset", "csv_boxes", "CsvBoxes"),
]
CONTRACTS = (Backbone, Neck, RoIHead, ClassificationLoss, BoxLoss, TargetCreator, Hook, Evaluator, Transform,
             DetectionDataset)
RPN_SMALL = {"train_pre_nms": 200, "train_post_nms": 32, "test_pre_nms": 200, "test_post_nms": 16, "min_size": 2}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def namespace() -> dict:
    # A real module, as a plugin's would be: pydantic resolves the Params annotations in it.
    module = types.ModuleType("detkit_plugin_docs_example")
    sys.modules[module.__name__] = module
    try:
        for code in blocks("python"):
            exec(compile(code, str(DOC), "exec"), module.__dict__)  # noqa: S102 - the documentation's own examples
        yield module.__dict__
    finally:
        del sys.modules[module.__name__]


@pytest.fixture
def plugins(namespace, clean_registry) -> dict:
    """The page's classes, registered under their section-2 names for this test."""
    for kind, name, cls in PLUGINS:
        registry(kind).add(name, namespace[cls])
    return namespace


def merged(base: dict, fragment: dict) -> dict:
    """``fragment`` laid over ``base``; a component of another ``type`` replaces the base's."""
    out = dict(base)
    for key, value in fragment.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("type", old.get("type")) == old.get("type"):
            out[key] = merged(old, value)
        else:
            out[key] = value
    return out


def targets_of(*boxes_labels):
    return [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(l)}
            for b, l in boxes_labels]


IMAGES = [torch.rand(3, 64, 80), torch.randint(0, 256, (3, 72, 64), dtype=torch.uint8)]
TARGETS = targets_of(([[10.0, 10.0, 40.0, 50.0]], [1]), ([[20.0, 30.0, 60.0, 70.0], [5.0, 5.0, 40.0, 30.0]], [2, 0]))


def train_and_detect(model_cfg: dict, num_classes: int = 3):
    """One optimizer step and one detection pass of the detector ``model_cfg`` describes; returns both."""
    torch.manual_seed(0)
    detector = registry("detector").build(model_cfg, num_classes=num_classes)
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01)
    trainer = registry("trainer").build({"type": "faster_rcnn_trainer"}, model=detector, optimizer=optimizer)
    detector.train()
    losses = trainer.train_step(IMAGES, TARGETS)
    assert set(losses) == {"rpn_loc", "rpn_cls", "roi_loc", "roi_cls", "total"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    detector.eval()
    with torch.no_grad(), detector.detection_settings(score_thresh=0.0):
        detections = detector(IMAGES)
    assert [len(d["scores"]) > 0 for d in detections] == [True, True]
    assert all(int(d["labels"].max()) < num_classes for d in detections)
    return detector, losses


# ------------------------------------------------------------------- the page
def test_every_python_example_runs_and_every_contract_class_is_exercised(namespace):
    defined = {name for name, obj in namespace.items()
               if isinstance(obj, type) and issubclass(obj, CONTRACTS) and obj not in CONTRACTS
               and obj.__module__ == "detkit_plugin_docs_example"}
    assert defined == {cls for _, _, cls in PLUGINS}, "a docs/plugins.md example is not exercised here (PLUGINS)"


def test_section_2_declares_the_names_the_examples_are_used_by():
    import tomllib

    declared = tomllib.loads(blocks("toml")[0])["project"]["entry-points"]
    found = {(group.removeprefix("detkit."), name, target.split(":")[1])
             for group, entries in declared.items() for name, target in entries.items()}
    assert found == set(PLUGINS)


def test_every_yaml_fragment_is_a_valid_config(plugins, tiny_dict, tmp_path, monkeypatch):
    from detkit.config import validate

    monkeypatch.chdir(tmp_path)  # relative data roots of the fragments resolve here
    fragments = [yaml.safe_load(b) for b in blocks("yaml")]
    assert len(fragments) >= 7
    for fragment in fragments:
        validate(merged(tiny_dict, fragment), "docs/plugins.md")


# -------------------------------------------------------------- model parts
def test_the_documented_plugins_train_and_detect_together(plugins):
    """SmallNet, the RoI head, both losses and both target creators in one detector."""
    detector, losses = train_and_detect({
        "type": "faster_rcnn",
        "backbone": {"type": "small_net", "width": 32},
        "rpn": {"type": "rpn", "mid_channels": 32, "anchor": {"scales": [2, 4]}, "proposal": RPN_SMALL,
                "anchor_target": {"type": "iou_anchor", "pos_iou": 0.5}},
        "roi_head": {"type": "mean_pool", "cls_loss": {"type": "softmax_focal", "gamma": 1.5},
                     "loc_loss": {"type": "iou", "weight": 2.0}, "proposal_target": {"type": "iou_proposal"}},
        "preprocess": {"min_size": 64, "max_size": 80},
    })
    assert type(detector.roi_head).__name__ == "MeanPoolRoIHead"
    assert type(detector.rpn.anchor_target).__name__ == "IoUAnchorTarget"
    assert losses["roi_cls"] > 0 and losses["roi_loc"] > 0


def test_the_small_net_tail_is_the_box_heads(plugins):
    detector = registry("detector").build({"type": "faster_rcnn", "backbone": {"type": "small_net", "width": 32},
                                           "rpn": {"type": "rpn", "mid_channels": 32}}, num_classes=2)
    keys = [k for k in detector.state_dict() if ".tail." in k or "_tail" in k]
    assert keys and all(k.startswith("roi_head.box_head.tail.") for k in keys), keys


def test_the_multi_level_examples_train_and_detect(plugins):
    fpn = next(f["model"] for f in map(yaml.safe_load, blocks("yaml")) if "two_level" in str(f))
    fpn["preprocess"] = {"min_size": 64, "max_size": 80}  # the page's 96 px, smaller for speed
    detector, _ = train_and_detect(fpn)
    assert list(detector.neck.output_shape()) == ["P3", "P4", "P5"]
    assert type(detector.roi_head.box_head).__name__ == "TwoMLPHead"
    # The same backbone with the page's neck (levels C3, C4 at 64 channels).
    detector, _ = train_and_detect({
        "type": "faster_rcnn", "backbone": {"type": "two_level"}, "neck": {"type": "lateral", "out_channels": 64},
        "rpn": {"type": "rpn", "mid_channels": None, "anchor": {"sizes": [[16], [32]]}, "proposal": RPN_SMALL},
        "roi_head": {"type": "roi_head", "pooler": {"type": "multiscale_roi_align", "in_features": ["C3", "C4"]},
                     "box_head": {"type": "two_mlp", "representation_size": 64}},
        "preprocess": {"min_size": 64, "max_size": 80},
    })
    assert {s.channels for s in detector.neck.output_shape().values()} == {64}


def test_a_backbone_without_a_tail_detects_with_two_mlp_and_is_one_line_with_backbone_tail(plugins):
    model = {"type": "faster_rcnn", "backbone": {"type": "mobilenet_v3_small"},
             "rpn": {"type": "rpn", "mid_channels": 32, "anchor": {"scales": [2, 4]}, "proposal": RPN_SMALL},
             "roi_head": {"type": "roi_head", "pooler": {"type": "roi_align", "output_size": 7},
                          "box_head": {"type": "two_mlp", "representation_size": 64}},
             "preprocess": {"min_size": 64, "max_size": 80}}
    detector = registry("detector").build(model, num_classes=3).eval()
    with torch.no_grad(), detector.detection_settings(score_thresh=0.0):
        assert [len(d["scores"]) > 0 for d in detector(IMAGES)] == [True, True]
    model["roi_head"] = {"type": "roi_head", "pooler": {"type": "roi_align", "output_size": 7}}
    with pytest.raises(ConfigError, match="backbone_tail runs the backbone's RoI tail.*use type two_mlp"):
        registry("detector").build(model, num_classes=3)


def test_pretrained_weights_come_from_the_cache_or_fail_offline_in_one_line(plugins, tmp_path, monkeypatch):
    from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small

    net = plugins["MobileNetV3Small"]
    assert Path(MobileNet_V3_Small_Weights.IMAGENET1K_V1.url).name == plugins["MOBILENET_FILE"]
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(url, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    where = tmp_path / "hub" / "checkpoints"
    with pytest.raises(ConfigError, match=rf"pretrained: true: cannot download .*no network.*place "
                                          rf"{plugins['MOBILENET_FILE']} in {re.escape(str(where))}"):
        net(net.Params(pretrained=True))
    with pytest.raises(ConfigError, match="pretrained: .*missing.pth not found"):
        net(net.Params(pretrained=str(tmp_path / "missing.pth")))
    # A file in the cache is used as it is, without a download.
    torch.manual_seed(1)
    reference = mobilenet_v3_small()
    where.mkdir(parents=True)
    torch.save(reference.state_dict(), where / plugins["MOBILENET_FILE"])
    built = net(net.Params(pretrained=True))
    assert torch.equal(built.body[0][0].weight, reference.features[0][0].weight)
    assert not torch.equal(net().body[0][0].weight, reference.features[0][0].weight)


def test_a_config_error_from_a_constructor_reaches_the_user_as_it_is(plugins):
    with pytest.raises(ConfigError, match="model.neck.width: 10 is not a multiple"):
        plugins["check_width"](10, 4)
    plugins["check_width"](8, 4)
    with pytest.raises(ConfigError, match="^model.neck: lateral needs a backbone with several levels"):
        registry("detector").build({"type": "faster_rcnn", "backbone": {"type": "small_net"},
                                    "neck": {"type": "lateral"}}, num_classes=2)


def test_the_iou_loss_is_weighted_and_zero_for_a_perfect_box(plugins):
    from detkit import boxes as box_ops
    from detkit.interfaces import MatchedBoxes

    loss = plugins["IoULoss"]
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0], [0.0, 0.0, 4.0, 4.0]])
    gt = torch.tensor([[2.0, 0.0, 12.0, 10.0], [5.0, 5.0, 25.0, 15.0], [9.0, 9.0, 9.0, 9.0]])
    target = box_ops.encode(ref[:2], gt[:2])
    target = torch.cat((target, torch.zeros(1, 4)))  # the ignored row's target means nothing
    labels = torch.tensor([1, 2, -1])
    boxes = MatchedBoxes(ref, target)
    zero = torch.zeros(3, 4)
    one, two = loss()(zero, target, labels, boxes=boxes), loss(loss.Params(weight=2.0))(zero, target, labels, boxes=boxes)
    # Row 0: the anchor as the box, IoU 8/12 with its ground truth; row 1 matches exactly.
    assert float(one) == pytest.approx((1 - 8 / 12) / 2) and float(two) == pytest.approx(2 * float(one))
    assert float(loss()(target, target, labels, boxes=boxes)) == pytest.approx(0.0, abs=1e-6)


def test_the_target_creators_label_by_iou(plugins):
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [50.0, 50.0, 60.0, 60.0]])
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros(0, 4)]
    deltas, labels = plugins["IoUAnchorTarget"]()(gt, anchors, torch.tensor([[64, 64], [64, 64]]))
    # IoU 1, 1/2 (between 0.3 and 0.6: ignored), 0; the image without boxes is all background.
    assert labels.tolist() == [[1, -1, 0], [0, 0, 0]]
    assert deltas.shape == (2, 3, 4) and torch.equal(deltas, torch.zeros(2, 3, 4))
    rois = torch.tensor([[1.0, 0.0, 11.0, 10.0], [40.0, 40.0, 50.0, 50.0], [0.0, 0.0, 30.0, 30.0]])
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 30.0, 30.0], [40.0, 40.0, 48.0, 50.0]])]
    sampled = plugins["IoUProposalTarget"]()(rois, torch.tensor([0, 0, 1]), gt,
                                              [torch.tensor([2]), torch.tensor([0, 1])], (0.1, 0.1, 0.2, 0.2))
    # Proposals, then each image's padded ground truth (image 0 has one box of two slots: -1).
    assert sampled.labels.tolist() == [3, 0, 1, 3, -1, 1, 2]
    assert sampled.image_indices.tolist() == [0, 0, 1, 0, 0, 1, 1]
    expected = torch.tensor([-0.1, 0.0, 0.0, 0.0]) / torch.tensor([0.1, 0.1, 0.2, 0.2])  # (5 - 6) / 10
    assert torch.allclose(sampled.loc_targets[0], expected, atol=1e-6)
    assert torch.equal(sampled.loc_targets[1], torch.zeros(4))


# ------------------------------------------------------- data and evaluation
def write_csv_set(root: Path, n: int, seed: int = 0) -> list[list]:
    """``n`` PNG images of 64 x 80 px and their boxes.csv under ``root``; returns the rows."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        pixels = torch.randint(0, 256, (64, 80, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / f"im{i}.png")
        rows.append([f"im{i}.png", 4.0 + i, 6.0, 40.0, 50.0 - i, "circle"])
        rows.append([f"im{i}.png", 30.0, 20.0, 70.0, 60.0, "square"])
    with open(root / "boxes.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return rows


def test_the_csv_data_set_feeds_the_loader_and_its_transform_flips_it(plugins, tmp_path):
    from detkit.data.config import DataConfig
    from detkit.data.loader import build_dataset, build_loader

    rows = write_csv_set(tmp_path / "train", 3)
    spec = {"type": "csv_boxes", "root": str(tmp_path / "train"), "classes": ["circle", "square"]}
    data = DataConfig.model_validate({"train": spec, "batch_size": 2, "transforms": [{"type": "vflip", "p": 1.0}]})
    plain = build_dataset(data, "train", augment=False)
    assert len(plain) == 3 and plain.classes == ["circle", "square"]
    assert plain.annotation(1)[0] == (64, 80)
    batch = next(iter(build_loader(plain, batch_size=2, shuffle=False)))
    assert [im.shape for im in batch.images] == [(3, 64, 80)] * 2 and batch.images[0].dtype == torch.uint8
    assert batch.image_ids == ["im0", "im1"] and batch.labels[1].tolist() == [0, 1]
    assert torch.equal(batch.boxes[1], torch.tensor([r[1:5] for r in rows[2:4]], dtype=torch.float32))
    # Train mode runs data.transforms: vflip with p=1 mirrors every box top to bottom.
    flipped = build_dataset(data, "train")
    image, target = flipped[1]
    original, before = plain[1]
    assert torch.equal(image, original.flip(-2))
    assert torch.equal(target["boxes"][:, [1, 3]], 64 - before["boxes"][:, [3, 1]])
    assert torch.equal(target["boxes"][:, [0, 2]], before["boxes"][:, [0, 2]])


def test_a_bad_csv_row_is_one_line_naming_the_file_and_line(plugins, tmp_path):
    write_csv_set(tmp_path, 1)
    with open(tmp_path / "boxes.csv", "a") as f:
        f.write("im0.png,1,2,3,4,triangle\n")
    with pytest.raises(DataError, match=rf"boxes.csv:3: expected file,x1,y1,x2,y2,class"):
        registry("dataset").build({"type": "csv_boxes", "root": str(tmp_path), "classes": ["circle", "square"]})
    with pytest.raises(DataError, match="boxes.csv: not found"):
        registry("dataset").build({"type": "csv_boxes", "root": str(tmp_path / "nowhere"), "classes": ["circle"]})


def test_the_f1_evaluator_counts_and_names_its_headline(plugins):
    from detkit.engine.evaluate import ImageResult, compute_metrics
    from detkit.sections import EvalConfig

    ev = registry("evaluator").build({"type": "f1", "score": 0.5}, classes=["a", "b"], category_ids=None)
    gt = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]]), "labels": torch.tensor([0, 1]),
           "difficult": torch.zeros(2, dtype=torch.bool)},
          {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0]), "difficult": torch.zeros(1, dtype=torch.bool)}]
    preds = [{"boxes": torch.tensor([[0.0, 0, 10, 11], [20, 20, 40, 40], [50, 50, 60, 60]]),
              "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 0, 1])},
             {"boxes": torch.tensor([[1.0, 0, 10, 10], [0, 0, 10, 10]]), "scores": torch.tensor([0.9, 0.1]),
              "labels": torch.tensor([0, 0])}]
    ev.update(preds, gt)
    out = ev.compute()
    # 4 counted detections, 2 correct (a in both images); 3 boxes, 2 found: P = 1/2, R = 2/3.
    assert out["precision"] == pytest.approx(0.5) and out["recall"] == pytest.approx(2 / 3)
    assert out["F1"] == pytest.approx(4 / 7)
    assert out["per_class"]["a"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1)) and out["per_class"]["b"] == 0.0
    ev.reset()
    assert math.isnan(ev.compute()["F1"])
    # In the engine: metrics named f1/<metric>, the headline as eval.best's default.
    results = [ImageResult(image_id=str(i), prediction=p, target=t) for i, (p, t) in enumerate(zip(preds, gt))]
    cfg = EvalConfig.model_validate({"metric": [{"type": "f1", "score": 0.5}, "voc"]})
    metrics = compute_metrics(results, ["a", "b"], cfg)
    assert metrics["best_key"] == "f1/F1" and metrics["metrics"]["f1/F1"] == pytest.approx(4 / 7)
    assert metrics["metrics"]["f1/recall"] == pytest.approx(2 / 3) and "voc/mAP" in metrics["metrics"]


# ------------------------------------------------------------ the hook, in a run
def test_a_short_run_with_the_page_s_data_set_transform_evaluator_and_hook(plugins, tiny_dict, tmp_path):
    """Two steps and one evaluation: the CSV hook's rows, and the loop state the page promises when."""
    from detkit.config import validate
    from detkit.engine.train import train

    seen: dict[str, object] = {}

    class Probe(Hook):
        def before_train(self):
            seen["before_train"] = (list(self.loop.loss_names), dict(self.loop.losses), self.loop.eval_result,
                                    self.loop.run_dir.is_dir(), self.loop.step, self.loop.total_steps)

        def before_epoch(self):
            seen["before_epoch"] = list(self.loop.loss_names)

        def before_step(self):
            seen.setdefault("first before_step", list(self.loop.loss_names))

        def after_step(self):
            seen.setdefault("first after_step", (list(self.loop.loss_names), self.loop.step))
            if self.loop.log_now():
                seen.setdefault("window at a log point", len(self.loop.window))

        def after_epoch(self):
            seen["after_epoch"] = (self.loop.eval_result is not None, self.loop.improved)

        def after_train(self):
            seen["completed"] = self.loop.completed

    registry("hook").add("probe", Probe)
    write_csv_set(tmp_path / "train", 8)
    write_csv_set(tmp_path / "val", 4, seed=1)
    classes = ["circle", "square"]
    cfg = merged(tiny_dict, {
        "data": {"train": {"type": "csv_boxes", "root": str(tmp_path / "train"), "classes": classes},
                 "val": {"type": "csv_boxes", "root": str(tmp_path / "val"), "classes": classes},
                 "transforms": [{"type": "hflip"}, {"type": "vflip"}]},
        "train": {"epochs": 1, "hooks": [{"type": "loss_csv", "file": "losses.csv"}, {"type": "probe"}]},
        "eval": {"metric": [{"type": "f1", "score": 0.0}, "voc"]},
    })
    run_dir = train(validate(cfg), out_dir=tmp_path / "run")
    names = ["rpn_loc", "rpn_cls", "roi_loc", "roi_cls", "total"]
    assert seen["before_train"] == ([], {}, None, True, 0, 2)
    assert seen["before_epoch"] == [] and seen["first before_step"] == []
    assert seen["first after_step"] == (names, 1)
    assert seen["window at a log point"] == 0  # the LoggingHook emptied it into its record
    assert seen["after_epoch"] == (True, True) and seen["completed"] is True
    with open(run_dir / "losses.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", *names] and [r[0] for r in rows[1:]] == ["1", "2"]
    assert all(math.isfinite(float(v)) for r in rows[1:] for v in r[1:])
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    assert evals[0]["best_key"] == "f1/F1" and 0.0 <= evals[0]["f1/F1"] <= 1.0


def test_a_classification_loss_is_refused_in_a_box_loss_slot(plugins):
    with pytest.raises(ComponentValidationError, match="role 'classification'"):
        registry("roi_head").validate({"type": "roi_head", "loc_loss": {"type": "softmax_focal"}})
