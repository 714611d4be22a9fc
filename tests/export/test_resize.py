"""The traceable resize and size rule reproduce eager code exactly: Pillow's 8-bit resize, torch's antialiased
resize, resize_shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from detkit.resize import resize_float, resize_shape, resize_uint8, resized_size

# (in_h, in_w, out_h, out_w): shrinking and growing each side, one side unchanged, and both
# orders of Pillow's passes (it runs the vertical one first when the height shrinks by more
# than twice as many pixels as the width).
CASES = [
    (40, 50, 97, 120),  # both grow
    (90, 70, 30, 25),  # both shrink, horizontal first
    (100, 60, 30, 55),  # height shrinks much more: vertical first
    (60, 100, 20, 140),  # height shrinks, width grows: vertical first
    (64, 48, 64, 90),  # height unchanged
    (33, 77, 150, 77),  # width unchanged
    (181, 23, 37, 200),
]


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["bicubic", "bilinear"])
@pytest.mark.parametrize("case", CASES)
def test_pil_backend_is_bit_exact(case, kind):
    h, w, nh, nw = case
    array = random_image(h, w, seed=sum(case))
    resample = Image.BICUBIC if kind == "bicubic" else Image.BILINEAR
    expected = np.asarray(Image.fromarray(array).resize((nw, nh), resample)).transpose(2, 0, 1)
    image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    got = resize_uint8(image, torch.tensor(nh), torch.tensor(nw), kind)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))


@pytest.mark.parametrize("kind", ["bicubic", "bilinear"])
@pytest.mark.parametrize("case", CASES)
def test_traced_antialiased_resize_equals_torch(case, kind):
    """Traced, the antialiased resize runs as two matrix products (ONNX has none): torch's kernel's values."""
    h, w, nh, nw = case
    image = torch.from_numpy(random_image(h, w, seed=sum(case) + 1)).permute(2, 0, 1).float() / 255.0
    expected = F.interpolate(image[None], size=(nh, nw), mode=kind, align_corners=False, antialias=True)[0]
    traced = torch.jit.trace(lambda x, s: resize_float(x, s[0], s[1], kind, antialias=True),
                             (torch.rand(3, 20, 30), torch.tensor([40, 50])))
    got = traced(image, torch.tensor([nh, nw]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # float32 rounding of torch's kernel


def test_traced_resize_keeps_sizes_dynamic():
    def resize(image, size):
        return resize_uint8(image, size[0], size[1], "bicubic")

    traced = torch.jit.trace(resize, (torch.zeros(3, 20, 30, dtype=torch.uint8), torch.tensor([40, 50])))
    h, w, nh, nw = CASES[2]
    array = random_image(h, w, seed=7)
    expected = np.asarray(Image.fromarray(array).resize((nw, nh), Image.BICUBIC)).transpose(2, 0, 1)
    got = traced(torch.from_numpy(array).permute(2, 0, 1).contiguous(), torch.tensor([nh, nw]))
    np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))


@pytest.mark.parametrize("rounding", ["round", "floor", "truncate"])
@pytest.mark.parametrize("limits", [(600, 1000), (600, None), (128, 128), (800, 1333)])
def test_resized_size_equals_resize_shape(rounding, limits):
    min_size, max_size = limits
    sizes = [(h, w) for h in (1, 7, 97, 128, 333, 375, 500, 599, 600, 1000, 1999) for w in (1, 13, 128, 353, 500, 640, 1280)]
    for h, w in sizes:
        got = resized_size(torch.tensor(h), torch.tensor(w), min_size, max_size, rounding)
        assert tuple(int(v) for v in got) == resize_shape(h, w, min_size, max_size, rounding=rounding), (h, w)


def test_onnx_resize_and_size_rule_equal_eager_torch(tmp_path):
    """Under onnxruntime the filter weights and output sizes are the eager ones, for every size tried.

    The ONNX exporter computes arithmetic between 0-d float64 tensors in float32 (as_f64): that once
    moved Pillow-style integer weights (90 -> 77 px) by one unit and pixels by one level, and it
    sizes a 153x576 image to 43x160 instead of 42x160 under a 128/160 px rule.
    """
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import warnings

    from detkit.resize import filter_weights, pil_weights

    class Probe(torch.nn.Module):
        def forward(self, height, width, out):
            new_h, new_w = resized_size(height, width, 128, 160, "round")
            return filter_weights(height, out, "bicubic"), pil_weights(height, out, "bilinear"), new_h, new_w

    path = tmp_path / "probe.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Probe(), (torch.tensor(96), torch.tensor(64), torch.tensor(50)), str(path), dynamo=False,
                          opset_version=17, input_names=["h", "w", "out"], output_names=["wt", "pil", "nh", "nw"],
                          dynamic_axes={"wt": {0: "o", 1: "i"}, "pil": {0: "o", 1: "i"}})
    session = ort.InferenceSession(str(path))
    cases = [(90, 150, 77), (150, 90, 128), (333, 500, 128), (97, 61, 83), (500, 375, 128), (153, 576, 42),
             (576, 45, 160)]
    for height, width, out in cases:
        expected = Probe()(torch.tensor(height), torch.tensor(width), torch.tensor(out))
        got = session.run(None, {"h": np.array(height), "w": np.array(width), "out": np.array(out)})
        # float64 weights to the last bits (the float32 error is ~1e-8); integer weights and sizes exactly.
        np.testing.assert_allclose(got[0], expected[0].numpy(), rtol=0, atol=1e-12, err_msg=f"{height} -> {out}")
        for e, g in zip(expected[1:], got[1:]):
            np.testing.assert_array_equal(g, e.numpy(), err_msg=f"{height}x{width} -> {out}")
