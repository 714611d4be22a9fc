import pytest
import torch

from detkit.engine import checkpoint as ck
from detkit.errors import CheckpointError


def test_atomic_save_keeps_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, model={"w": torch.ones(2)}, config={}, classes=["a"], step=1)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(path, model={"w": torch.zeros(2)}, config={}, classes=["a"], step=2)
    monkeypatch.undo()
    loaded = ck.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_foreign_and_corrupt_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        ck.load_checkpoint(bad)
    plain = tmp_path / "plain.pth"
    torch.save({"extractor.0.weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not a detkit checkpoint.*import-weights"):
        ck.load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_load_model_state_lists_mismatches():
    model = torch.nn.Linear(3, 2)
    state = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        ck.load_model_state(model, state, "x.pt")
    msg = str(info.value)
    assert "missing keys: bias" in msg
    assert "unexpected keys: extra" in msg
    assert "weight (2, 4) (model expects (2, 3))" in msg


def test_without_pretrained_clears_nested_values():
    section = {"type": "faster_rcnn", "backbone": {"type": "vgg16", "pretrained": "/x.pth"}, "n": [{"pretrained": True}]}
    assert ck.without_pretrained(section) == {
        "type": "faster_rcnn", "backbone": {"type": "vgg16", "pretrained": None}, "n": [{"pretrained": None}]
    }


def test_a_stored_config_that_no_longer_validates_names_the_checkpoint(tmp_path):
    """Issue 9 case 13: the user did not write that config, the checkpoint holds it."""
    path = tmp_path / "old.pt"
    model = {"type": "faster_rcnn", "backbone": {"type": "tiny", "renamed_since": 3}}
    ck.save_checkpoint(path, model={}, config={"model": model}, classes=["a"])
    with pytest.raises(CheckpointError) as info:
        ck.load_detector(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: the config stored in this checkpoint no longer validates")
    assert "model.backbone.renamed_since: Extra inputs are not permitted" in msg
