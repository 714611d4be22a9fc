"""Fine-tuning torchvision's COCO models to new classes with configs/finetune/, as the README says.

``detkit import-weights --classes`` makes a checkpoint of the import config's
model with fresh class layers (tests/builtins/test_import_torchvision.py);
here, each fine-tune config must build exactly that model, key for key and
shape for shape, so ``train.init_weights`` loads it; and a tiny random-weight
stand-in of the config (its neck, RPN and box head, a ``tiny`` backbone, set
small by ``--set`` overrides) started from such a checkpoint trains on a
synthetic VOC set with the config's optimizer and schedule (a larger lr: random
weights), and its loss falls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detkit.config import load_config
from detkit.registry import build_detector, registry

REPO = Path(__file__).resolve().parents[2]
FINETUNE = REPO / "configs" / "finetune"
MODELS = ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
          "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"]
CLASSES = ["circle", "square", "triangle", "cross"]


@pytest.mark.parametrize("name", MODELS)
def test_finetune_config_builds_the_imported_model(name):
    cfg = load_config(FINETUNE / f"{name}.yaml")
    imported = load_config(REPO / "configs" / "import" / f"torchvision_{name}.yaml")
    with torch.device("meta"):
        ours = build_detector(cfg.to_dict()["model"], len(CLASSES)).state_dict()
        theirs = build_detector(imported.to_dict()["model"], len(CLASSES)).state_dict()
    assert len(ours) > 300
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert cfg.train.init_weights == f"finetune_init/{name}.pt"


def test_finetune_configs_cover_every_importable_model():
    from detkit.engine.import_weights import TORCHVISION_MODELS

    for name in TORCHVISION_MODELS:
        assert (FINETUNE / f"{name}.yaml").is_file(), name
    assert set(MODELS) == set(TORCHVISION_MODELS)


def tiny(name: str) -> list[str]:
    """Overrides that keep the config's neck, RPN and box head types but make the model tiny."""
    head = (["model.roi_head.box_head.conv_channels=16", "model.roi_head.box_head.fc_dims=[32]"]
            if name.endswith("_v2") else ["model.roi_head.box_head.representation_size=32"])
    return [
        "model.backbone={type: tiny, channels: [8, 16, 16, 32], out_features: [C2, C3, C4], freeze_stages: 1}",
        "model.neck.out_channels=16", *head,
        "model.rpn.anchor.sizes=[[16], [32], [64], [128]]",  # P2-P4 and the max-pooled P5
        "model.roi_head.pooler.in_features=[P2, P3, P4]",
        "model.preprocess.min_size=64", "model.preprocess.max_size=96",
        "model.rpn.proposal.train_pre_nms=200", "model.rpn.proposal.train_post_nms=64",
        "model.rpn.proposal.test_pre_nms=100", "model.rpn.proposal.test_post_nms=32",
        "model.rpn.anchor_target={type: anchor_target, n_sample: 64}", "model.roi_head.proposal_target.n_sample=32",
    ]


@pytest.mark.parametrize("name", MODELS)
def test_tiny_standin_finetunes_from_an_imported_checkpoint_and_the_loss_falls(tmp_path, name):
    from detkit.data.export import export_synthetic
    from detkit.data.synthetic import SyntheticShapes
    from detkit.engine.checkpoint import load_checkpoint, save_checkpoint
    from detkit.engine.train import train

    voc = tmp_path / "voc"
    for split, n in (("train", 8), ("val", 2)):
        synth = SyntheticShapes(SyntheticShapes.Params(num_images=n, size_range=(64, 96), object_size=(20, 40),
                                                       split=split, seed=3))
        export_synthetic(voc, "voc", synth)
    data = [f"data.{s}={{type: voc, root: {voc}, split: {s}, classes: [{', '.join(CLASSES)}]}}"
            for s in ("train", "val")]
    # A tiny model from random weights takes a larger step than the real one from COCO's weights.
    run_cfg = [*tiny(name), *data, "data.num_workers=0", "train.epochs=4", "train.scheduler.warmup_iters=0",
               "train.optimizer.lr=0.02",
               "train.log_interval=1", "eval.interval=4"]
    # What import-weights would write: the model with COCO weights everywhere but fresh class layers.
    model_cfg = load_config(FINETUNE / f"{name}.yaml", run_cfg).to_dict()["model"]
    torch.manual_seed(123)  # not the run's own seed: its fresh model would be this one
    coco = registry("detector").build(model_cfg, num_classes=len(CLASSES))
    init = save_checkpoint(tmp_path / "init.pt", model=coco.state_dict(), config={"model": model_cfg},
                           classes=CLASSES, imported_from={"source": "torchvision", "model": name})

    cfg = load_config(FINETUNE / f"{name}.yaml", [*run_cfg, f"train.init_weights={init}"])
    assert cfg.to_dict()["train"]["optimizer"]["momentum"] == 0.9  # the config's own optimizer
    run = train(cfg, out_dir=tmp_path / "run")

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["total"] for r in records if r["type"] == "train"]
    assert len(losses) == 16  # 4 epochs of 4 steps, each logged
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses
    assert any(r["type"] == "eval" for r in records)
    # It started from the checkpoint: the frozen first stage is the checkpoint's, bit for bit.
    state = load_checkpoint(run / "last.pt")["model"]
    frozen = [k for k, v in coco.named_parameters() if not v.requires_grad]
    assert frozen and all(torch.equal(state[k], coco.state_dict()[k]) for k in frozen)
