"""The detkit-cascade distribution: Cascade R-CNN's roi_head from entry points, trained, scored, exported.

Runs when plugins/detkit-cascade is installed (the README's set-up installs it);
skips otherwise.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from detkit import boxes as box_ops
from detkit.cli import app
from detkit.interfaces import ImageBatch, Proposals, ShapeSpec
from detkit.registry import registry

try:
    importlib.metadata.distribution("detkit-cascade")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("detkit-cascade is not installed: pip install -e plugins/detkit-cascade", allow_module_level=True)
detkit_cascade = pytest.importorskip("detkit_cascade")

runner = CliRunner()

TINY_CASCADE = {
    "type": "faster_rcnn",
    "backbone": {"type": "tiny", "channels": [8, 16, 32, 32], "blocks_per_stage": 1,
                 "out_features": ["C3", "C4"], "init": "pytorch"},
    "neck": {"type": "fpn", "out_channels": 32, "top_block": "maxpool"},
    "rpn": {"type": "rpn", "anchor": {"sizes": [[16], [32], [64]], "ratios": [0.5, 1.0, 2.0]},
            "proposal": {"train_pre_nms": 300, "train_post_nms": 64, "test_pre_nms": 300, "test_post_nms": 48,
                         "min_size": 2}},
    "roi_head": {"type": "cascade",
                 "pooler": {"type": "multiscale_roi_align", "in_features": ["P3", "P4", "P5"],
                            "sampling_ratio": 1, "aligned": True},
                 "box_head": {"type": "two_mlp", "representation_size": 64},
                 "proposal_target": {"type": "proposal_target", "n_sample": 32}},
    "preprocess": {"min_size": 128, "max_size": 128, "size_divisible": 32},
    "score_thresh": 0.2,
}


def cascade_model(num_classes=3, **roi_head):
    cfg = copy.deepcopy(TINY_CASCADE)
    cfg["roi_head"].update(roi_head)
    torch.manual_seed(0)
    return registry("detector").build(cfg, num_classes=num_classes)


def shapes_batch():
    """Two images with bright rectangles on noise, and their boxes."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for boxes in ([[10, 12, 50, 60], [70, 30, 120, 90]], [[20, 20, 80, 70]]):
        img = torch.rand(3, 112, 128, generator=g) * 0.3
        for x1, y1, x2, y2 in boxes:
            img[:, y1:y2, x1:x2] = 0.9
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.arange(len(boxes)) % 3})
    return images, targets


def test_registered_through_its_distribution():
    entry = registry("roi_head").get("cascade")
    assert entry.provider.distribution == "detkit-cascade"
    assert entry.factory is detkit_cascade.CascadeRoIHead
    result = runner.invoke(app, ["list-plugins", "--kind", "roi_head", "--json", "--load"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["cascade"]["distribution"] == "detkit-cascade" and rows["cascade"]["status"] == "ok"
    assert rows["roi_head"]["distribution"] == "detkit"


def test_imports_only_detkits_public_modules():
    """A third party's code: detkit's contracts, registry and box coding, nothing of the built-ins or the engine."""
    import ast
    from pathlib import Path

    allowed = {"detkit", "detkit.interfaces", "detkit.registry", "detkit.boxes", "detkit.errors"}
    package = Path(detkit_cascade.__file__).parent
    imported = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
    ours = {m for m in imported if m.split(".")[0] in ("detkit", "detkit_builtins")}
    assert ours and ours <= allowed, sorted(ours - allowed)
    assert all(not name.startswith("_") for m in ours for name in m.split("."))


def test_config_defaults_are_the_papers():
    head = cascade_model().roi_head
    assert len(head.stages) == 3 and head.iou_thresholds == [0.5, 0.6, 0.7]
    assert head.stage_loss_weights == [1.0, 0.5, 0.25]
    assert [t.pos_iou_thresh for t in head.proposal_targets] == [0.5, 0.6, 0.7]
    assert [t.neg_iou_thresh_hi for t in head.proposal_targets] == [0.5, 0.6, 0.7]
    assert torch.allclose(head.stages[2].loc_std, torch.tensor([0.033, 0.033, 0.067, 0.067]))
    assert all(s.cls_loc.out_features == 4 for s in head.stages)  # class-agnostic
    # Each stage has its own box head weights.
    assert head.stages[0].box_head.fc6.weight is not head.stages[1].box_head.fc6.weight


@pytest.mark.parametrize("change, field", [
    ({"iou_thresholds": [0.5, 0.6]}, "iou_thresholds has 2 entries for num_stages 3"),
    ({"num_stages": 4}, "iou_thresholds has 3 entries for num_stages 4"),
    ({"proposal_target": {"type": "anchor_target"}}, "proposal_target.type"),
    ({"loc_normalize_stds": [[0.1, 0.1, 0.2, 0.2]] * 2 + [[0.1, 0.0, 0.2, 0.2]]}, "loc_normalize_stds"),
])
def test_bad_config_is_one_line_naming_the_field(tmp_path, change, field):
    config = {"model": {**copy.deepcopy(TINY_CASCADE), "roi_head": {**TINY_CASCADE["roi_head"], **change}},
              "data": {"train": {"type": "synthetic", "num_images": 4}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 2
    assert "model.roi_head" in result.output and field in result.output


def test_trains_and_the_loss_falls():
    model = cascade_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    trainer = registry("trainer").build({"type": "faster_rcnn_trainer", "seed": 0}, model=model, optimizer=opt)
    images, targets = shapes_batch()
    totals = []
    for _ in range(12):
        losses = trainer.train_step(images, targets)
        totals.append(float(losses["total"]))
    names = {f"s{k}_roi_{x}" for k in range(3) for x in ("loc", "cls")} | {"rpn_loc", "rpn_cls", "total"}
    assert set(losses) == names
    assert all(math.isfinite(t) for t in totals)
    assert sum(totals[-3:]) < 0.8 * sum(totals[:3]), totals


def test_stage_losses_carry_the_stage_weights():
    images, targets = shapes_batch()
    losses = []
    for weights in ([1.0, 1.0, 1.0], [1.0, 0.5, 0.25]):
        model = cascade_model(stage_loss_weights=weights).train()
        model.set_sampling_generator(torch.Generator().manual_seed(0))
        losses.append(model(images, targets))
    plain, weighted = losses
    for k, w in enumerate([1.0, 0.5, 0.25]):
        for name in (f"s{k}_roi_loc", f"s{k}_roi_cls"):
            assert plain[name] > 0, name
            assert torch.allclose(weighted[name], w * plain[name]), name


def _record_samplers(head):
    """Wrap each stage's sampler to keep what it was given and what it returned."""
    seen = []
    for k, sampler in enumerate(head.proposal_targets):
        def spy(*args, _k=k, _orig=sampler.forward, **kwargs):
            out = _orig(*args, **kwargs)
            seen.append((_k, args[0].clone(), out))
            return out
        sampler.forward = spy
    return seen


def test_each_stage_samples_at_its_iou_threshold_from_the_refined_boxes():
    model = cascade_model(iou_thresholds=[0.3, 0.5, 0.8]).train()
    head = model.roi_head
    with torch.no_grad():  # a stage 0 that moves every box, so refined boxes differ from its RoIs
        head.stages[0].cls_loc.bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.5]))
    stage0_out = []
    head.stages[0].register_forward_hook(lambda m, i, o: stage0_out.append(o[0].detach()))
    seen = _record_samplers(head)
    images, targets = shapes_batch()
    model(images, targets)
    assert [k for k, _, _ in seen] == [0, 1, 2]
    batch, scaled = model.preprocess(images, targets)
    gt = [t["boxes"] for t in scaled]
    for k, _, sampled in seen:
        iou = torch.stack([box_ops.box_iou(b[None], gt[i]).max() for b, i in zip(sampled.boxes, sampled.image_indices)])
        t = [0.3, 0.5, 0.8][k]
        fg, bg = sampled.labels > 0, sampled.labels == 0
        assert fg.any() and bg.any(), k
        assert (iou[fg] >= t - 1e-6).all() and (iou[bg] < t).all(), k
    # Stage 1's candidates are stage 0's sampled RoIs moved by stage 0's deltas, clipped to the image.
    rois0 = seen[0][2]
    sizes = batch.image_sizes.float()[rois0.image_indices]
    expected = box_ops.clip(box_ops.decode(rois0.boxes, stage0_out[0][:, 0], head.stages[0].loc_std),
                            sizes[:, 0], sizes[:, 1])
    assert torch.allclose(seen[1][1], expected, atol=1e-4)
    assert not torch.allclose(seen[1][1], rois0.boxes, atol=1.0)


def _fixed_head(num_classes=2):
    """A single-map cascade head whose stages predict fixed logits and deltas (zero weights, set biases)."""
    head = registry("roi_head").build(
        {"type": "cascade", "pooler": {"type": "roi_align", "output_size": 7},
         "box_head": {"type": "two_mlp", "representation_size": 16}},
        num_classes=num_classes, input_shapes={"features": ShapeSpec(8, 8)},
    ).eval()
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, -1.0, 3.0], [0.5, 0.5, 0.5]])
    deltas = torch.tensor([[0.5, 0.0, 0.2, 0.0], [0.0, -0.4, 0.0, 0.3], [0.3, 0.3, -0.3, 0.0]])
    with torch.no_grad():
        for stage, lg, dl in zip(head.stages, logits, deltas):
            stage.score.weight.zero_()
            stage.score.bias.copy_(lg)
            stage.cls_loc.weight.zero_()
            stage.cls_loc.bias.copy_(dl)
    return head, logits, deltas


def test_inference_averages_the_stages_scores_and_takes_the_last_stages_boxes():
    head, logits, deltas = _fixed_head()
    features = torch.rand(1, 8, 16, 16)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [30.0, 40.0, 90.0, 120.0]])
    batch = ImageBatch(torch.zeros(1, 3, 128, 128), torch.tensor([[128, 100]]), torch.tensor([[128, 100]]),
                       torch.ones(1))
    with torch.no_grad():
        pred, losses = head(features, Proposals(boxes, torch.zeros(2, dtype=torch.int64)), batch)
    assert losses == {}
    expected = torch.softmax(logits, dim=1).mean(dim=0)[1:]
    assert pred.scores.shape == (2, 2)
    assert torch.allclose(pred.scores, expected.expand(2, 2), atol=1e-6)
    # Not any one stage's scores.
    for lg in logits:
        assert not torch.allclose(pred.scores[0], torch.softmax(lg, 0)[1:], atol=1e-3)
    b = boxes
    for k, stage in enumerate(head.stages):
        b = box_ops.decode(b, deltas[k].expand(2, 4), stage.loc_std)
        if k < 2:
            b = box_ops.clip(b, 128.0, 100.0)
    assert pred.boxes.shape == (2, 2, 4)
    assert torch.allclose(pred.boxes, b[:, None].expand(2, 2, 4), atol=1e-4)


def test_class_specific_regression_refines_with_the_best_class():
    model = cascade_model(class_agnostic=False).eval()
    assert model.roi_head.stages[0].cls_loc.out_features == 4 * 4
    images, _ = shapes_batch()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and all(o["boxes"].shape[1] == 4 for o in out)
    model.train()
    losses = model(*shapes_batch())
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_gives_the_eval_forward(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    from detkit.export import compare_detections, example_image, export_model, load_exported

    model = cascade_model().eval()
    with torch.no_grad():  # distinct, varied scores (see tests/export/conftest.py)
        model.rpn.score.weight.mul_(1000.0)
        for stage in model.roi_head.stages:
            stage.score.weight.mul_(30.0)
            stage.cls_loc.weight.mul_(100.0)
    path = export_model(model, tmp_path / f"cascade.{fmt}", fmt)
    run = load_exported(path)
    compared = 0
    for i, (h, w) in enumerate(((150, 90), (60, 84))):
        image = example_image(h, w, seed=i + 1)
        with torch.inference_mode():
            expected = model([image])[0]
        assert len(expected["scores"]) >= 5, (h, w)
        problem = compare_detections(run(image), expected)
        assert problem is None, f"{(h, w)}: {problem}"
        compared += len(expected["scores"])
    assert compared >= 10


def test_train_eval_predict_export_from_the_command_line(tmp_path, tiny_dict):
    """The same commands as for Faster R-CNN, on the tiny config with the cascade head."""
    import numpy as np
    from PIL import Image

    tiny_dict["model"]["roi_head"] = {
        "type": "cascade", "pooler": {"type": "roi_align", "output_size": 7, "sampling_ratio": 1},
        "box_head": {"type": "two_mlp", "representation_size": 32},
        "proposal_target": {"type": "proposal_target", "n_sample": 16},
    }
    tiny_dict["eval"]["metric"] = ["coco", "voc"]
    config = tmp_path / "cascade.yaml"
    config.write_text(yaml.safe_dump(tiny_dict, sort_keys=False))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), "-o", str(run)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert {"s0_roi_loc", "s1_roi_cls", "s2_roi_cls"} <= set(train[-1])
    assert any(r["type"] == "eval" and "coco/AP75" in r for r in records)

    result = runner.invoke(app, ["eval", str(run / "last.pt"), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "coco: AP" in result.output

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(image)
    result = runner.invoke(app, ["predict", str(run / "last.pt"), str(image), "--out", str(tmp_path / "pred"),
                                 "--score-thresh", "0"])
    assert result.exit_code == 0, result.output
    detections = json.loads((tmp_path / "pred" / "photo.json").read_text())["detections"]
    assert len(detections) > 0

    # export --check runs the file on two test images against predict.
    result = runner.invoke(app, ["export", str(run / "last.pt"), "--format", "torchscript",
                                 "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.pt").is_file()


def test_cpu_recipe_is_the_faster_rcnn_recipe_with_the_cascade_head():
    """configs/cascade/tiny.yaml validates and differs from configs/scratch/tiny.yaml only in the RoI head,
    so benchmarks/cascade_vs_faster.py compares the heads alone."""
    from pathlib import Path

    from detkit.config import load_config

    repo = Path(__file__).resolve().parents[2]
    cascade = load_config(repo / "configs" / "cascade" / "tiny.yaml").to_dict()
    faster = load_config(repo / "configs" / "scratch" / "tiny.yaml").to_dict()
    head = cascade["model"].pop("roi_head")
    faster["model"].pop("roi_head")
    assert head["type"] == "cascade" and head["num_stages"] == 3
    assert cascade["model"] == faster["model"]
    assert {k: v for k, v in cascade.items() if k not in ("model", "name")} == \
        {k: v for k, v in faster.items() if k not in ("model", "name")}


def test_train_compile_gets_every_stages_box_head():
    """``train.compile`` compiles what the detector names: the backbone, the neck and each stage's head.

    The detector asks its RoI head (``RoIHead.compile_modules``); it used to read a
    ``box_head`` attribute that only the built-in head has.
    """
    model = cascade_model()
    parts = model.compile_modules()
    heads = [stage.box_head for stage in model.roi_head.stages]
    assert len(heads) == 3 and len({id(h) for h in heads}) == 3
    assert parts[:2] == [model.backbone, model.neck]
    assert len(parts) == 5 and all(any(p is h for p in parts) for h in heads)
