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


# ------------------------------------------------------- images as they look
def _as_pil_shows(path, sixteen_bit: bool = False) -> torch.Tensor:
    """PIL's own reading: ``exif_transpose`` then ``convert("RGB")``; 16-bit grey by its high byte."""
    from PIL import ImageOps

    with Image.open(path) as im:
        turned = ImageOps.exif_transpose(im)
        if sixteen_bit:
            grey = (np.asarray(turned) >> 8).astype(np.uint8)
            arr = np.repeat(grey[:, :, None], 3, axis=2)
        else:
            arr = np.asarray(turned.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _photo(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    """Blocky random RGB (blocks survive JPEG well; not square, so a turn changes the shape)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_does(tmp_path, suffix, orientation):
    from detkit.data.image import image_size

    path = tmp_path / f"o{orientation}{suffix}"
    Image.fromarray(_photo()).save(path, exif=_exif(orientation), **({"quality": 95} if suffix == ".jpg" else {}))
    out = read_image_uint8(path)
    expected = _as_pil_shows(path)
    assert expected.shape == ((3, 56, 40) if orientation >= 5 else (3, 40, 56))
    assert out.dtype == torch.uint8 and torch.equal(out, expected)
    assert image_size(path) == tuple(out.shape[1:])  # the header agrees with the pixels


@pytest.mark.parametrize("suffix", [".jpg", ".mpo"])
def test_rotated_jpeg_and_mpo_take_the_fast_path(tmp_path, monkeypatch, suffix):
    """EXIF orientation is turned in torch, not by decoding through PIL; an MPO (phone cameras'
    multi-picture JPEG) gives its first picture, as PIL does."""
    import detkit.data.image as image_module

    path = tmp_path / f"phone{suffix}"
    more = {"save_all": True, "append_images": [Image.fromarray(_photo(seed=3))]} if suffix == ".mpo" else {}
    Image.fromarray(_photo()).save(path, exif=_exif(6), **more)
    calls = []
    fast = image_module._decode_jpeg
    monkeypatch.setattr(image_module, "_decode_jpeg", lambda data: calls.append(1) or fast(data))
    out = read_image_uint8(path)
    assert calls == [1] and out.shape == (3, 56, 40) and torch.equal(out, _as_pil_shows(path))


def _save_mode(path, mode: str) -> None:
    rgb = Image.fromarray(_photo())
    if mode == "P":
        rgb.quantize(colors=16).save(path)
    elif mode in ("LA", "RGBA"):
        im = rgb.convert(mode)
        im.putalpha(Image.fromarray(_photo(seed=1)[:, :, 0]))
        im.save(path)
    else:
        rgb.convert(mode).save(path)


@pytest.mark.parametrize("mode, suffix", [
    ("P", ".png"), ("LA", ".png"), ("RGBA", ".png"), ("L", ".png"), ("1", ".png"),
    ("CMYK", ".jpg"), ("CMYK", ".tif"), ("RGB", ".tif"), ("RGB", ".webp"), ("P", ".gif"),
])  # fmt: skip
def test_every_mode_gives_pils_rgb(tmp_path, mode, suffix):
    path = tmp_path / f"{mode}{suffix}"
    _save_mode(path, mode)
    with Image.open(path) as im:
        assert im.mode == mode  # the file really is of that kind
    out = read_image_uint8(path)
    assert out.shape == (3, 40, 56) and torch.equal(out, _as_pil_shows(path))


def test_16_bit_grey_png_is_scaled_not_white(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, (40, 56), dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path, exif=_exif(6))
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    out = read_image_uint8(path)
    assert torch.equal(out, _as_pil_shows(path, sixteen_bit=True))
    assert torch.equal(out[0], torch.from_numpy((np.rot90(grey, -1) >> 8).astype(np.uint8)))
    assert 100 < out.float().mean() < 155  # uniform 16-bit noise: about 127, not 255


def _png16_rgb(path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_16_bit_rgb_png_is_scaled_by_its_high_byte(tmp_path):
    rgb16 = np.random.default_rng(1).integers(0, 65536, (40, 56, 3), dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    _png16_rgb(path, rgb16)
    out = read_image_uint8(path)
    assert torch.equal(out, _as_pil_shows(path))
    assert torch.equal(out, torch.from_numpy((rgb16 >> 8).astype(np.uint8)).permute(2, 0, 1))


@pytest.mark.parametrize("mode, kind", [("I", "32-bit integer"), ("F", "32-bit float")])
def test_32_bit_images_are_refused_in_one_line(tmp_path, mode, kind):
    path = tmp_path / f"{mode}.tif"
    Image.fromarray(np.full((8, 8), 70000, np.int32 if mode == "I" else np.float32)).save(path)
    with pytest.raises(DataError) as info:
        read_image_uint8(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and kind in msg


def test_every_read_path_gives_the_same_pixels(tmp_path):
    """Training and eval (the readers), predict and the API (paths and PIL images) share one reader."""
    from detkit.api import to_image_tensor
    from detkit.data.voc import VOCDataset

    root = tmp_path / "voc"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    grey = np.random.default_rng(2).integers(0, 65536, (40, 56), dtype=np.uint16)
    Image.fromarray(grey).save(root / "JPEGImages" / "a.png", exif=_exif(8))
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.png</filename><object><name>x</name>"
        "<bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object></annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    path = root / "JPEGImages" / "a.png"
    expected = _as_pil_shows(path, sixteen_bit=True)
    assert expected.shape == (3, 56, 40)
    image, _ = VOCDataset(VOCDataset.Params(root=str(root), split="train", classes=["x"]))[0]
    assert torch.equal((image * 255).round().byte(), expected)
    assert torch.equal(to_image_tensor(str(path)), expected)
    with Image.open(path) as im:
        assert torch.equal(to_image_tensor(im), expected)
