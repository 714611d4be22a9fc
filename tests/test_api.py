"""The public Python API: detkit.load / Detector.predict / detkit.train, and a light `import detkit`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import detkit
from detkit.errors import DataError

@pytest.fixture
def checkpoint(tmp_path, tiny_checkpoint):
    return tiny_checkpoint(tmp_path / "m.pt", ["circle", "square"])  # every RoI a confident "square"


@pytest.fixture
def photo(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    path = tmp_path / "street.png"
    Image.fromarray(array).save(path)
    return path, array


def test_load_and_predict_every_kind_of_image(checkpoint, photo):
    path, array = photo
    model = detkit.load(checkpoint, device="cpu")
    assert isinstance(model, detkit.Predictor) and model.classes == ["circle", "square"] and model.device.type == "cpu"
    dets = model.predict(path)
    assert isinstance(dets, list) and len(dets) == 1 and isinstance(dets[0], detkit.Detections)
    ref = dets[0]
    assert len(ref) > 0 and ref.names == ["square"] * len(ref) and ref.labels.tolist() == [1] * len(ref)
    assert ref.image_size == (48, 80) and ref.source == str(path)
    assert ref.boxes.shape == (len(ref), 4) and bool((ref.boxes[:, 2] <= 80).all() and (ref.boxes[:, 3] <= 48).all())
    chw = torch.from_numpy(array).permute(2, 0, 1)
    inputs = [str(path), Image.open(path), array, chw, chw.float() / 255]
    batch = model.predict(inputs)
    assert len(batch) == 5
    for i, d in enumerate(batch):
        assert torch.allclose(d.boxes, ref.boxes, atol=1e-3), i
        assert torch.allclose(d.scores, ref.scores, atol=1e-4) and d.names == ref.names, i
    assert [d.source for d in batch] == [str(path), None, None, None, None]
    stacked = model.predict(torch.stack([chw, chw]))  # [N, 3, H, W] is N images
    assert len(stacked) == 2 and torch.allclose(stacked[1].boxes, ref.boxes, atol=1e-3)
    record = ref.to_dict()
    assert record["width"] == 80 and record["detections"][0]["name"] == "square"


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.full((3, 8, 8), 7.0), "float tensor image must hold values in 0..1"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), r"\[3, H, W\] \(channels first\)"),
        (np.zeros((8, 8, 3), dtype=np.float32), "numpy image must be uint8"),
        (42, "expected a file path, PIL.Image"),
        ("no/such.jpg", "no/such.jpg: image file not found"),
    ],
)
def test_bad_images_are_one_clear_error(checkpoint, image, message):
    model = detkit.load(checkpoint, device="cpu")
    with pytest.raises(DataError, match=message):
        model.predict(image)


def test_train_from_a_dict_returns_the_run_directory(tmp_path, tiny_dict):
    tiny_dict["data"]["train"]["classes"] = ["circle", "square"]
    tiny_dict["data"]["val"] = None
    tiny_dict["train"].update(epochs=1, max_iters_per_epoch=1)
    run_dir = detkit.train(tiny_dict, overrides=["train.seed=3"], out_dir=tmp_path / "run")
    assert run_dir == tmp_path / "run" and (run_dir / "last.pt").is_file()
    model = detkit.load(run_dir / "last.pt", device="cpu")
    assert model.classes == ["circle", "square"]


def test_cli_predict_goes_through_the_api(checkpoint, photo, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from detkit.cli import app

    calls = []
    original = detkit.Predictor.predict
    monkeypatch.setattr(detkit.Predictor, "predict", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    result = CliRunner().invoke(app, ["predict", str(checkpoint), str(photo[0]), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert calls == [1] and (tmp_path / "out" / "street.json").is_file()


@pytest.mark.slow  # subprocesses: seconds each
def test_import_detkit_is_light():
    code = (
        "import sys, detkit\n"
        "heavy = [m for m in ('torch', 'torchvision', 'detkit.api', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from detkit.registry import registry\n"
        "assert detkit.registry.registry is registry and callable(detkit.load)\n"
        "assert 'detkit.api' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _mixed_images() -> list[torch.Tensor]:
    """Five images of three network-input sizes (the tiny config's 64-pixel long side)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 48, 80), (3, 64, 64), (3, 48, 80), (3, 40, 70), (3, 64, 64)]
    return [torch.randint(0, 255, s, dtype=torch.uint8, generator=g) for s in shapes]


def _count_forwards(model) -> list[int]:
    """Images per forward pass of ``model.module``, appended as they run."""
    passes: list[int] = []
    model.module.register_forward_pre_hook(lambda _m, args: passes.append(len(args[0])))
    return passes


def test_max_detections_caps_each_image_to_the_best(checkpoint):
    model = detkit.load(checkpoint, device="cpu")
    images = _mixed_images()
    full = model.predict(images)
    assert all(len(d) > 3 for d in full)  # more than the cap, so the cap has something to cut
    capped = model.predict(images, max_detections=3)
    for f, c in zip(full, capped):
        assert len(c) == 3
        assert torch.allclose(c.scores, f.scores[:3]) and torch.allclose(c.boxes, f.boxes[:3])
    assert [len(d) for d in model.predict(images)] == [len(d) for d in full]  # the model's own setting is back
    with pytest.raises(detkit.errors.ConfigError, match="max_detections must be at least 1"):
        model.predict(images, max_detections=0)


def test_a_list_runs_in_batches_of_one_input_size_and_equals_single_calls(checkpoint):
    model = detkit.load(checkpoint, device="cpu")
    images = _mixed_images()
    passes = _count_forwards(model)
    single = [model.predict(x)[0] for x in images]
    assert passes == [1] * 5
    passes.clear()
    batched = model.predict(images)  # the default batch size
    assert sorted(passes) == [1, 2, 2]  # the two 48x80, the two 64x64, the 40x70 alone
    for i, (s, b) in enumerate(zip(single, batched)):
        assert len(s) > 0 and len(b) == len(s), i
        assert torch.allclose(b.boxes, s.boxes, atol=1e-4) and torch.allclose(b.scores, s.scores, atol=1e-5), i
        assert b.labels.tolist() == s.labels.tolist() and b.image_size == s.image_size, i
    passes.clear()
    same = [images[0]] * 6
    assert len(model.predict(same, batch_size=4)) == 6 and passes == [4, 2]


def test_padding_other_sizes_into_one_batch_would_change_detections(checkpoint):
    """Why a batch holds one input size: padded next to a larger image, a small one's detections change."""
    model = detkit.load(checkpoint, device="cpu")
    images = _mixed_images()
    single = [model.predict(x)[0] for x in images]
    with torch.inference_mode():
        padded = model.module(images)
    assert any(len(p["boxes"]) != len(s) or not torch.allclose(p["boxes"], s.boxes, atol=1e-4)
               for p, s in zip(padded, single))


def test_images_padded_to_one_size_share_a_batch_and_keep_their_detections(tiny_dict):
    """With ``size_divisible`` 32 a 38x64 input and a 64x64 one are both padded to 64x64 alone, so they batch."""
    from detkit.config import validate
    from detkit.registry import registry

    tiny_dict["model"]["preprocess"]["size_divisible"] = 32
    cfg = validate(tiny_dict).to_dict()
    torch.manual_seed(0)
    module = registry("detector").build(cfg["model"], num_classes=2)
    with torch.no_grad():
        module.roi_head.score.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    model = detkit.Predictor(module, ["circle", "square"], cfg, torch.device("cpu"))
    images = _mixed_images()[:2]  # 48x80 -> 38x64, 64x64
    single = [model.predict(x)[0] for x in images]
    passes = _count_forwards(model)
    batched = model.predict(images)
    assert passes == [2]
    for s, b in zip(single, batched):
        assert len(s) > 0 and len(b) == len(s)
        assert torch.allclose(b.boxes, s.boxes, atol=1e-4) and torch.allclose(b.scores, s.scores, atol=1e-5)
