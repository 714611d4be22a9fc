"""Import of torchvision's fasterrcnn_mobilenet_v3_large_fpn and _320_fpn: same detections as torchvision.

As for the ResNet50-FPN model (test_import_torchvision.py, whose helpers these
tests use): torchvision's model with seeded random weights (nothing is
downloaded), its BatchNorm statistics and affine weights drawn too (so the
frozen, conv-folded BatchNorm is compared, not an identity), its RPN object
logits spread so that torchvision's ``rpn_score_thresh`` (0.05) drops
proposals, and its box predictor scaled so that scores are distinct.
``detkit predict`` on JPEG files of two sizes must give torchvision's
detections on the same decoded images within 0.01 px and 1e-4 in score.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.models import detection

from detkit.engine.checkpoint import load_checkpoint, load_detector
from test_import_torchvision import assert_same_detections, records_match_torchvision, scene

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 5
# (model, torchvision's keyword arguments, detkit's overrides): the 320 model at its own sizes;
# the 800 px one smaller for speed (the network is the same, only sizes and proposal counts differ).
MODELS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": ({}, []),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        dict(min_size=224, max_size=320),
        ["model.preprocess.min_size=224", "model.preprocess.max_size=320"],
    ),
}
JPEG_SIZES = [(150, 200), (230, 170)]  # (h, w): landscape and portrait, both resized


def torchvision_model(name: str, rpn_bias: float = -2.0, **kwargs):
    torch.manual_seed(0)
    model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1, **kwargs)
    with torch.no_grad():
        # Random BatchNorm affine weights, and statistics measured on a few images (one pass in
        # train mode): with the initial statistics (mean 0, var 1) the random net's deep features
        # lose nearly all spatial variation, and near-equal scores make the compared order arbitrary.
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # the running statistics become this pass's batch statistics
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        calibration = torch.stack([(textured(100 + i, 128, 128) - mean) / std for i in range(4)])
        model.backbone.body.train()(calibration)
        # Object probabilities spread out; with a low rpn_bias many fall under the 0.05 RPN threshold.
        model.rpn.head.cls_logits.weight.normal_(0, 0.1)
        model.rpn.head.cls_logits.bias.fill_(rpn_bias)
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.01)
    return model.eval()


def textured(seed: int, height: int, width: int) -> torch.Tensor:
    """``scene`` with pixel noise: flat regions give equal RPN scores at many places, and a tie at the
    proposal cut would make the compared proposal sets differ by which of equals each side keeps."""
    g = torch.Generator().manual_seed(seed)
    return (scene(seed, height, width) + 0.08 * torch.randn(3, height, width, generator=g)).clamp(0, 1)


def jpeg_files(tmp_path) -> list[Path]:
    paths = []
    for i, (h, w) in enumerate(JPEG_SIZES):
        pixels = (textured(10 + i, h, w) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        paths.append(tmp_path / f"img{i}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def import_model(tmp_path, name: str, model, overrides: list[str]) -> Path:
    from detkit.engine.import_weights import import_weights

    src = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), src)
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"c{i}\n" for i in range(NUM_CLASSES)))
    config = REPO / "configs" / "import" / f"torchvision_{name}.yaml"
    return import_weights(src, tmp_path / "out.pt", config, classes, overrides, source="torchvision", model=name)


@pytest.mark.parametrize("name", list(MODELS))
def test_predict_on_jpeg_files_equals_torchvision(tmp_path, name):
    from detkit.engine.predict import predict_files

    kwargs, overrides = MODELS[name]
    tv = torchvision_model(name, **kwargs)
    paths = jpeg_files(tmp_path)
    dst = import_model(tmp_path, name, tv, overrides)
    ckpt = load_checkpoint(dst)
    assert ckpt["imported_from"]["model"] == name and "fresh" not in ckpt["imported_from"]
    records = predict_files(dst, paths, tmp_path / "out", device="cpu")
    assert records_match_torchvision(paths, records, tv) >= 40


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_forward_equals_torchvision_and_the_rpn_threshold_bites(tmp_path, name):
    """Two images in one padded batch, as torchvision runs them; with no cap after NMS (1000), the
    0.05 RPN score threshold decides which proposals go on."""
    kwargs, overrides = MODELS[name]
    tv = torchvision_model(name, rpn_bias=-4.0, **kwargs, rpn_post_nms_top_n_test=1000)
    model, _ = load_detector(import_model(tmp_path, name, tv, [*overrides, "model.rpn.proposal.test_post_nms=1000"]))
    images = [textured(1, 120, 160), textured(2, 144, 128)]
    with torch.no_grad():
        theirs = tv(images)
        ours = model(images)
    for o, t in zip(ours, theirs):
        assert_same_detections(o, t)
    # Without the threshold torchvision keeps more proposals: the equality above depends on it.
    with torch.no_grad():
        batch, _ = model.preprocess(images)
        proposals, _ = model.rpn(model.features(batch.tensor), batch)
        model.rpn.proposal_creator.score_thresh = 0.0
        unfiltered, _ = model.rpn(model.features(batch.tensor), batch)
    assert 20 < len(proposals.boxes) < len(unfiltered.boxes)


def test_wrong_key_is_named_in_torchvisions_mobilenet_spelling(tmp_path):
    from detkit.errors import CheckpointError

    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    tv = torchvision_model(name)
    state = tv.state_dict()
    del state["backbone.body.4.block.0.0.weight"]
    torch.save(state, tmp_path / "broken.pth")
    from detkit.engine.import_weights import import_weights

    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"c{i}\n" for i in range(NUM_CLASSES)))
    config = REPO / "configs" / "import" / f"torchvision_{name}.yaml"
    with pytest.raises(CheckpointError) as err:
        import_weights(tmp_path / "broken.pth", tmp_path / "out.pt", config, classes, source="torchvision", model=name)
    assert "backbone.body.4.block.0.0.weight" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.pt").exists()
