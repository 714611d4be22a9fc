"""Import of torchvision's Faster R-CNN models: same detections as torchvision itself.

torchvision's model is built with seeded random weights (nothing is
downloaded), its BatchNorm statistics and affine weights drawn at random (so a
norm mapped to the wrong place shows), its box predictor scaled so that scores
spread over (0, 1) instead of saturating, and its state dict saved to a file.
``import_weights`` converts that file with ``configs/import/torchvision_<model>.yaml``
(min/max size and proposal counts lowered on both sides for speed), and
detkit's eval forward, and ``detkit predict`` on JPEG files, must give
torchvision's ``model.eval()(images)`` detections on the same decoded images
within 0.01 px and 1e-4 in score.  Each model of :data:`MODELS` is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.models import detection

from detkit.engine.checkpoint import load_checkpoint, load_detector
from detkit.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[2]
# The torchvision builders checked here (torchvision.models.detection.<name>); each imports with
# configs/import/torchvision_<name>.yaml.
MODELS = ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2"]
CONFIG = REPO / "configs" / "import" / "torchvision_fasterrcnn_resnet50_fpn.yaml"
NUM_CLASSES = 5  # foreground; torchvision counts background too


def config_of(name: str) -> Path:
    return REPO / "configs" / "import" / f"torchvision_{name}.yaml"


def small(min_size: int, max_size: int) -> tuple[dict, list[str]]:
    """torchvision's keyword arguments and detkit's overrides for the same small pipeline."""
    tv = dict(min_size=min_size, max_size=max_size, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100)
    ours = [f"model.preprocess.min_size={min_size}", f"model.preprocess.max_size={max_size}",
            "model.rpn.proposal.test_pre_nms=300", "model.rpn.proposal.test_post_nms=100"]
    return tv, ours


SMALL, OVERRIDES = small(120, 160)


def scene(seed: int, height: int, width: int) -> torch.Tensor:
    """A ``[3, H, W]`` float image: a colour gradient with a few filled shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: float(torch.rand((), generator=g))  # noqa: E731
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    bg = torch.stack([0.3 + 0.4 * ys * xs, 0.5 * ys + 0.2 * xs, 0.6 - 0.3 * xs + 0 * ys])
    im = Image.fromarray((bg.permute(1, 2, 0) * 255).to(torch.uint8).numpy())
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(r() * width * 0.7), int(r() * height * 0.7)
        x1, y1 = x0 + 15 + int(r() * width * 0.3), y0 + 15 + int(r() * height * 0.3)
        colour = tuple(int(255 * r()) for _ in range(3))
        (draw.ellipse if r() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return torch.from_numpy(__import__("numpy").asarray(im).copy()).permute(2, 0, 1).float() / 255


def build_torchvision(name: str, **kwargs):
    """torchvision's ``name`` with seeded random weights, scores spread, in eval mode."""
    torch.manual_seed(0)
    model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            # Fresh BatchNorms are the identity in eval mode: random statistics make each one count.
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.05)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.05)
        # Untrained objectness logits lie within ~1e-6 of each other at the proposal cuts (pre-NMS
        # top-k, post-NMS top-n), so rounding noise decided them; spread them (max logit ~5, far
        # from where float32 sigmoid saturates at 1.0 and ranks ties).
        model.rpn.head.cls_logits.weight.normal_(0, 0.03)
        # Untrained box-head activations are large: the default predictor init saturates every
        # score at 1.0, and ties make the order (and the 100-detection cap) arbitrary.
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.005)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.01)
    return model.eval()


@pytest.fixture(scope="module", params=MODELS)
def zoo_model(request):
    """``(name, torchvision model)`` for each model of :data:`MODELS`."""
    return request.param, build_torchvision(request.param, **SMALL)


@pytest.fixture(scope="module")
def torchvision_model():
    return build_torchvision("fasterrcnn_resnet50_fpn", **SMALL)


@pytest.fixture(scope="module")
def images():
    return [scene(1, 120, 160), scene(2, 144, 128)]


def assert_same_detections(ours: dict, theirs: dict, box_tol: float = 0.01, score_tol: float = 1e-4) -> int:
    """One-to-one match of every detection above the 100-detection cut: same label, box within
    ``box_tol`` px, score within ``score_tol``.  Returns how many were compared."""
    theirs = dict(theirs)
    if len(theirs["scores"]) == 100:  # capped: a detection near the 100th score may fall either side
        keep = theirs["scores"] > theirs["scores"][-1] + score_tol
        theirs = {k: v[keep] for k, v in theirs.items()}
        assert len(ours["boxes"]) >= len(theirs["boxes"])
    else:
        assert len(ours["boxes"]) == len(theirs["boxes"])
    assert len(theirs["boxes"]) > 0
    used = torch.zeros(len(ours["boxes"]), dtype=torch.bool)
    for box, score, label in zip(theirs["boxes"], theirs["scores"], theirs["labels"]):
        d = (ours["boxes"] - box).abs().amax(dim=1)
        ok = (d <= box_tol) & ((ours["scores"] - score).abs() <= score_tol) & (ours["labels"] == label - 1) & ~used
        assert ok.any(), f"torchvision detection {box.tolist()} {float(score):.4f} class {int(label)} unmatched"
        used[torch.nonzero(ok)[0, 0]] = True
    return len(theirs["boxes"])



def records_match_torchvision(paths, records, tv) -> int:
    """``detkit predict``'s records of JPEG ``paths`` against torchvision model ``tv`` on the same
    files decoded (float 0..1, one image per call, as predict runs them): every detection matched
    by :func:`assert_same_detections`. Returns how many were compared."""
    from torchvision.io import decode_image, read_file

    compared = 0
    for path, record in zip(paths, records):
        image = decode_image(read_file(str(path)))
        assert image.dtype == torch.uint8 and tuple(image.shape[1:]) == (record["height"], record["width"])
        with torch.no_grad():
            theirs = tv([image.float() / 255])[0]
        dets = record["detections"]
        ours = {
            "boxes": torch.tensor([d["box"] for d in dets], dtype=torch.float64).reshape(-1, 4),
            "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float64),
            "labels": torch.tensor([d["label"] for d in dets]),
        }
        theirs = {k: v.double() if v.is_floating_point() else v for k, v in theirs.items()}
        compared += assert_same_detections(ours, theirs, box_tol=0.01, score_tol=1e-4)
    return compared


def imported(tmp_path, torchvision_model, overrides: list[str], name: str = "fasterrcnn_resnet50_fpn"):
    """``detkit import-weights`` (the function the CLI calls) of the torchvision model into tmp_path/out.pt."""
    from detkit.engine.import_weights import import_weights

    src = tmp_path / "fasterrcnn.pth"
    torch.save(torchvision_model.state_dict(), src)
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"c{i}\n" for i in range(NUM_CLASSES)))
    return import_weights(src, tmp_path / "out.pt", config_of(name), classes, overrides, source="torchvision",
                          model=name)


def test_imported_model_gives_torchvisions_detections(tmp_path, zoo_model, images):
    name, torchvision_model = zoo_model
    dst = imported(tmp_path, torchvision_model, OVERRIDES, name)
    model, ckpt = load_detector(dst)
    assert ckpt["imported_from"]["source"] == "torchvision" and "fresh" not in ckpt["imported_from"]
    assert ckpt["imported_from"]["model"] == name
    with torch.no_grad():
        theirs = torchvision_model(images)
    with torch.no_grad():
        ours = model(images)  # both images in one padded batch, as torchvision runs them
    # Resized as torchvision does (one padded batch of 160 x 128 after padding to 32).
    assert [model.preprocess.output_size(*im.shape[-2:]) for im in images] == [(120, 160), (135, 120)]
    compared = 0
    for o, t in zip(ours, theirs):
        compared += assert_same_detections(o, t)
    assert compared >= 20


JPEG_SIZES = [(150, 200), (230, 170)]  # (h, w): landscape and portrait, both resized
FILE_SMALL, FILE_OVERRIDES = small(160, 256)


def test_predict_on_jpeg_files_equals_torchvision_on_the_decoded_images(tmp_path, zoo_model):
    """``detkit predict`` reads JPEG files; torchvision gets the same files decoded, as float 0..1."""
    from detkit.engine.predict import predict_files

    name, torchvision_model = zoo_model
    paths = []
    for i, (h, w) in enumerate(JPEG_SIZES):
        pixels = (scene(10 + i, h, w) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        paths.append(tmp_path / f"img{i}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    dst = imported(tmp_path, torchvision_model, FILE_OVERRIDES, name)
    records = predict_files(dst, paths, tmp_path / "out", device="cpu")

    tv = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1, **FILE_SMALL)
    tv.load_state_dict(torchvision_model.state_dict())
    tv.eval()
    assert records_match_torchvision(paths, records, tv) >= 20


def test_other_class_count_keeps_all_but_class_layers(tmp_path, torchvision_model):
    from detkit.engine.import_weights import import_weights

    src = tmp_path / "fasterrcnn.pth"
    torch.save({"model": torchvision_model.state_dict()}, src)
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    dst = import_weights(src, tmp_path / "out.pt", CONFIG, classes, OVERRIDES, source="torchvision")
    ckpt = load_checkpoint(dst)
    assert ckpt["classes"] == ["cat", "dog"]
    fresh = ckpt["imported_from"]["fresh"]
    assert fresh == ["roi_head.cls_loc.bias", "roi_head.cls_loc.weight", "roi_head.score.bias", "roi_head.score.weight"]
    state, theirs = ckpt["model"], torchvision_model.state_dict()
    assert state["roi_head.score.weight"].shape == (3, 1024)
    assert torch.equal(state["roi_head.box_head.fc6.weight"], theirs["roi_heads.box_head.fc6.weight"])
    assert torch.equal(state["neck.layer_blocks.3.0.weight"], theirs["backbone.fpn.layer_blocks.3.0.weight"])
    assert torch.equal(state["backbone.layer4.2.conv3.weight"], theirs["backbone.body.layer4.2.conv3.weight"])
    # Object logit in the odd channels, background channel zero.
    assert torch.equal(state["rpn.score.weight"][1::2], theirs["rpn.head.cls_logits.weight"])
    assert not state["rpn.score.weight"][0::2].any()

    # train.init_weights starts a run from it (the data must have the same classes).
    from detkit.engine.train import init_model_weights
    from detkit.registry import build_detector

    model = build_detector(ckpt["config"]["model"], 2)
    init_model_weights(model, dst, ["cat", "dog"])
    assert torch.equal(model.state_dict()["neck.inner_blocks.0.0.weight"], theirs["backbone.fpn.inner_blocks.0.0.weight"])
    with pytest.raises(ConfigError, match="train.init_weights: .* --classes"):
        init_model_weights(model, dst, ["cat", "dog", "bird"])


def test_cached_torchvision_file_is_used_without_src(tmp_path, monkeypatch, torchvision_model):
    """No SRC: the file in $TORCH_HOME's cache is used; nothing is downloaded."""
    from detkit.engine.import_weights import import_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    # A "COCO" file: torchvision's 91-way predictor, so the default class names apply.
    state = dict(torchvision_model.state_dict())
    g = torch.Generator().manual_seed(0)
    state["roi_heads.box_predictor.cls_score.weight"] = torch.randn(91, 1024, generator=g) * 0.005
    state["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(91)
    state["roi_heads.box_predictor.bbox_pred.weight"] = torch.randn(364, 1024, generator=g) * 0.01
    state["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(364)
    torch.save(state, cache / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth")

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    dst = import_weights(None, tmp_path / "coco.pt", CONFIG, None, OVERRIDES, source="torchvision")
    ckpt = load_checkpoint(dst)
    assert len(ckpt["classes"]) == 90 and ckpt["classes"][:3] == ["person", "bicycle", "car"]
    assert ckpt["imported_from"]["path"] == str(cache / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth")


def test_offline_without_file_names_the_file_and_directory(tmp_path, monkeypatch):
    from detkit.engine.import_weights import import_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError) as err:
        import_weights(None, tmp_path / "coco.pt", CONFIG, None, source="torchvision")
    msg = str(err.value)
    assert "\n" not in msg
    assert "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert not (tmp_path / "coco.pt").exists()


def test_unsupported_torchvision_models_say_why():
    from detkit.engine.import_weights import check_torchvision_model

    for name in ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
                 "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"):
        assert check_torchvision_model(name) == name
    with pytest.raises(ConfigError, match="one-stage"):
        check_torchvision_model("retinanet_resnet50_fpn")
    with pytest.raises(ConfigError, match="expected one of fasterrcnn_resnet50_fpn"):
        check_torchvision_model("fasterrcnn_resnet101_fpn")


def test_backbone_pretrained_true_offline_is_one_line(tmp_path, monkeypatch, offline_hub):
    """``pretrained: true`` fetches ImageNet weights into torch's cache; offline it names the file."""
    from detkit.registry import registry

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as err:
        registry("backbone").build({"type": "resnet50", "pretrained": True})
    msg = str(err.value)
    assert "\n" not in msg and "resnet50-0676ba61.pth" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert offline_hub == ["https://download.pytorch.org/models/resnet50-0676ba61.pth"]
