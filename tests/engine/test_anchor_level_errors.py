"""Multi-level anchor mistakes in a config are one line and exit 2 from `detkit train`, with nothing written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from detkit.cli import app

runner = CliRunner()


def _fpn(tiny_dict: dict, anchor: dict) -> dict:
    """The shared tiny config as a 3-level pyramid (C2-C4 + fpn + P6 = 4 feature levels)."""
    model = tiny_dict["model"]
    model["backbone"]["out_features"] = ["C2", "C3", "C4"]
    model["neck"] = {"type": "fpn", "out_channels": 16}
    model["rpn"]["anchor"] = anchor
    model["roi_head"]["pooler"] = {"type": "multiscale_roi_align", "in_features": ["P2", "P3", "P4"]}
    model["roi_head"]["box_head"] = {"type": "two_mlp", "representation_size": 32}
    return tiny_dict


@pytest.mark.parametrize("anchor, says", [
    ({"scales": [1, 2, 4]}, "model.rpn.anchor.sizes: missing; the features have 4 levels"),
    ({"sizes": [[16], [32], [64]]}, "model.rpn.anchor.sizes: 3 levels, but the features have 4"),
])
def test_anchor_levels_that_do_not_fit_the_features_are_one_line(tiny_dict, write_tiny, tmp_path, anchor, says):
    config = write_tiny(_fpn(tiny_dict, anchor))
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), "--out", str(run_dir)])
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "\n" not in text and "Traceback" not in text, text
    assert text.startswith(f"error: {says}"), text  # the field itself, not a plugin failure
    assert not run_dir.exists()


def test_the_same_pyramid_with_one_size_list_per_level_builds(tiny_dict):
    from detkit.config import validate
    from detkit.registry import build_detector

    cfg = validate(_fpn(tiny_dict, {"sizes": [[16], [32], [64], [128]]}), "<test>")
    model = build_detector(cfg.model.to_dict(), 3)
    assert model.multi_level and len(model.feature_sizes((64, 64))) == 4
