"""The Python examples of docs/plugins.md run, and the plugins they define train and detect.

Each ```python block is executed as written (```py marks a fragment that is
not run); the backbone, RoI head and loss it
defines are then registered for this process and used together in one
detector, so the plugin author's page cannot drift from the contracts.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from detkit.registry import ComponentValidationError, registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def blocks() -> list[str]:
    text = DOC.read_text()
    found = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(found) >= 4, "docs/plugins.md lost its Python examples"
    return found


@pytest.fixture(scope="module")
def namespace() -> dict:
    # A real module, as a plugin's would be: pydantic resolves the Params annotations in it.
    module = types.ModuleType("detkit_plugin_docs_example")
    sys.modules[module.__name__] = module
    try:
        for code in blocks():
            exec(compile(code, str(DOC), "exec"), module.__dict__)  # noqa: S102 - the documentation's own examples
        yield module.__dict__
    finally:
        del sys.modules[module.__name__]


def test_every_python_example_runs(namespace):
    for name in ("SmallNet", "MeanPoolRoIHead", "SoftmaxFocalLoss"):
        assert name in namespace, f"docs/plugins.md no longer defines {name}"


def test_the_documented_plugins_train_and_detect_together(namespace, clean_registry):
    registry("backbone").add("small_net", namespace["SmallNet"])
    registry("roi_head").add("mean_pool", namespace["MeanPoolRoIHead"])
    registry("loss").add("softmax_focal", namespace["SoftmaxFocalLoss"])
    torch.manual_seed(0)
    detector = registry("detector").build({
        "type": "faster_rcnn",
        "backbone": {"type": "small_net", "width": 32},
        "rpn": {"type": "rpn", "mid_channels": 32, "anchor": {"scales": [2, 4]},
                "proposal": {"train_pre_nms": 200, "train_post_nms": 32, "test_pre_nms": 200, "test_post_nms": 16,
                             "min_size": 2}},
        "roi_head": {"type": "mean_pool", "cls_loss": {"type": "softmax_focal", "gamma": 1.5},
                     "proposal_target": {"type": "proposal_target", "n_sample": 16}},
        "preprocess": {"min_size": 96, "max_size": 128},
    }, num_classes=3)
    assert type(detector.roi_head).__name__ == "MeanPoolRoIHead"
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01)
    trainer = registry("trainer").build({"type": "faster_rcnn_trainer"}, model=detector, optimizer=optimizer)
    images = [torch.rand(3, 96, 120), torch.rand(3, 110, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 30.0, 80.0, 90.0]]), "labels": torch.tensor([2])}]
    before = detector.roi_head.score.weight.detach().clone()
    detector.train()
    losses = trainer.train_step(images, targets)
    assert set(losses) == {"rpn_loc", "rpn_cls", "roi_loc", "roi_cls", "total"}
    assert torch.isfinite(losses["total"]) and losses["roi_cls"] > 0
    assert not torch.equal(before, detector.roi_head.score.weight), "the head's classifier was not trained"
    detector.eval()
    with torch.no_grad(), detector.detection_settings(score_thresh=0.0):
        detections = detector(images)
    assert [len(d["scores"]) > 0 for d in detections] == [True, True]
    assert all(int(d["labels"].max()) < 3 for d in detections)


def test_a_classification_loss_is_refused_in_a_box_loss_slot(namespace, clean_registry):
    registry("loss").add("softmax_focal", namespace["SoftmaxFocalLoss"])
    with pytest.raises(ComponentValidationError, match="role 'classification'"):
        registry("roi_head").validate({"type": "roi_head", "loc_loss": {"type": "softmax_focal"}})
