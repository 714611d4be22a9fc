"""Image decoding: the JPEG fast path gives PIL's pixels; huge images are refused in one line."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from detkit.data.image import LIMIT_ENV, read_image_uint8
from detkit.errors import DataError


def _pil_pixels(path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_fast_path_matches_pil(tmp_path, mode):
    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(48, 64, 3, generator=g) * 255).byte().numpy()
    path = tmp_path / "a.jpg"
    im = Image.fromarray(arr, "RGB")
    (im if mode == "RGB" else im.convert("L")).save(path, quality=90)
    out = read_image_uint8(path)
    assert out.shape == (3, 48, 64) and out.dtype == torch.uint8
    assert torch.equal(out, _pil_pixels(path))


def _png_claiming(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` (with a tiny, truncated body)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_huge_image_is_one_line_naming_file_size_and_setting(tmp_path, monkeypatch):
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    path = tmp_path / "huge.png"
    _png_claiming(path, 20000, 10000)
    with pytest.raises(DataError) as info:
        read_image_uint8(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "20000x10000" in msg and LIMIT_ENV in msg


def test_limit_setting_is_read_at_each_call(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(path)
    monkeypatch.setenv(LIMIT_ENV, "100")
    with pytest.raises(DataError, match="20x10"):
        read_image_uint8(path)
    monkeypatch.setenv(LIMIT_ENV, "200")
    assert read_image_uint8(path).shape == (3, 10, 20)
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(DataError, match=LIMIT_ENV):
        read_image_uint8(path)


@pytest.mark.slow
def test_training_on_a_huge_image_fails_with_one_line(tmp_path, monkeypatch, tiny_dict, write_tiny):
    from typer.testing import CliRunner

    from detkit.cli import app

    monkeypatch.delenv(LIMIT_ENV, raising=False)
    runner = CliRunner()
    root = tmp_path / "voc"
    made = runner.invoke(app, ["data", "synth", str(root), "-n", "2", "--image-size", "64", "--classes", "circle,square"])
    assert made.exit_code == 0, made.output
    huge = sorted((root / "JPEGImages").iterdir())[1]
    _png_claiming(huge, 20000, 10000)
    tiny_dict["data"].update(train={"type": "voc", "root": str(root), "split": "train", "classes": ["circle", "square"]},
                             val=None, batch_size=2, num_workers=1)
    tiny_dict["eval"] = {"interval": 0}
    path = write_tiny(tiny_dict)
    res = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1, res.output
    line = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and str(huge) in line[0] and "20000x10000" in line[0] and LIMIT_ENV in line[0]
    assert "Traceback" not in res.output
