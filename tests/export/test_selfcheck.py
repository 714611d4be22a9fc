"""``detkit export``'s self-check compares detections, or says that it compared none.

It runs on the checkpoint's validation images when its config has readable
ones, steps the score threshold down when the model detects nothing at its own,
refuses (exit 1, one line, nothing written) a file that disagrees, and warns
when even threshold 0 gives no detection.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from typer.testing import CliRunner

import detkit.export as export
from detkit.cli import app
from detkit.engine.checkpoint import save_checkpoint

runner = CliRunner()


def _checkpoint(tmp_path, model, config, full: dict | None = None):
    return save_checkpoint(tmp_path / "tiny.pt", model=model.state_dict(), config=full or {"model": config},
                           classes=["a", "b", "c"])


def _export(ckpt, out):
    return runner.invoke(app, ["export", str(ckpt), "--format", "torchscript", "--out", str(out)])


def _compared(output: str) -> int:
    return int(output.split("checked against predict: ")[1].split(" ")[0])


def test_a_model_that_detects_nothing_at_its_threshold_is_compared_at_a_lower_one(tiny_model, model_config, tmp_path):
    ckpt = _checkpoint(tmp_path, tiny_model, model_config(score_thresh=1.0))  # nothing scores above 1
    result = _export(ckpt, tmp_path / "m.ts")
    assert result.exit_code == 0, result.output
    assert _compared(result.output) > 0 and "warning" not in result.output
    assert re.search(r"at score_thresh 0\.\d+ \(none at the model's 1; compared a copy", result.output)  # which one
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the check copy is gone
    run = export.load_exported(tmp_path / "m.ts")
    assert len(run(export.example_image(80, 120))[0]) == 0  # the written file keeps the model's own threshold


def test_the_check_runs_on_the_checkpoints_validation_images(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "run" / "last.pt", ["circle", "square", "triangle", "cross"])
    seen = []
    real = export.verify_export

    def spy(model, path, *args, images=None, **kwargs):
        seen.append([tuple(i.shape) for i in images])
        return real(model, path, *args, images=images, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "verify_export", spy)
        result = _export(ckpt, tmp_path / "m.ts")
    assert result.exit_code == 0, result.output
    assert "on 4 validation images (the checkpoint's data.val)" in result.output and _compared(result.output) > 0
    assert seen == [[(3, 64, 64)] * 4]  # the tiny config's 64 px synthetic val images, not the 240x320 test ones


def test_a_file_that_disagrees_is_one_line_exit_1_and_nothing_is_written(tiny_model, model_config, tmp_path,
                                                                           monkeypatch):
    ckpt = _checkpoint(tmp_path, tiny_model, model_config(score_thresh=0.2))
    out = tmp_path / "m.ts"
    out.write_bytes(b"an earlier export")
    real = export.load_exported

    def shifted(path, **options):  # the file's boxes half a pixel off the model's
        run = real(path, **options)
        return lambda image: (lambda b, s, l: (b + 0.5, s, l))(*run(image))

    monkeypatch.setattr(export, "load_exported", shifted)
    result = _export(ckpt, out)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: the exported model disagrees"), result.output
    assert "not written (--no-check writes the file unchecked)" in lines[0]
    assert out.read_bytes() == b"an earlier export"  # the earlier file is kept as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ts", "tiny.pt"]  # no staged file left behind


def test_nothing_compared_even_at_threshold_0_warns(tiny_model, model_config, tmp_path):
    silent = copy.deepcopy(tiny_model)
    with torch.no_grad():  # background wins by e^1e4: every class probability is exactly 0
        silent.roi_head.score.bias[0] = 1e4
    ckpt = _checkpoint(tmp_path, silent, model_config(score_thresh=0.2))
    result = _export(ckpt, tmp_path / "m.ts")
    assert result.exit_code == 0, result.output
    assert "checked against predict: 0 detections" in result.output
    assert "warning:" in result.output and "compared nothing" in result.output and "even at score_thresh 0" in result.output


def test_an_unreadable_data_val_falls_back_to_test_images_and_says_why(tmp_path, tiny_dict):
    from detkit.export.selfcheck import check_images

    tiny_dict["data"]["val"] = {"type": "coco", "root": str(tmp_path / "gone"), "annotations": str(tmp_path / "x.json")}
    images, source = check_images(tiny_dict)
    assert [tuple(i.shape) for i in images] == [(3, 240, 320), (3, 300, 200)]
    assert source.startswith("2 random test images (its data.val cannot be read: ") and str(tmp_path / "gone") in source
    assert "\n" not in source
