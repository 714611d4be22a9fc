"""Entry-point discovery with fake distributions on a temporary sys.path entry."""

from __future__ import annotations

import sys

import pytest

from detkit import plugins
from detkit.errors import PluginLoadError, RegistryError
from detkit.registry import ComponentValidationError, registry

GOOD = """
from pydantic import BaseModel, ConfigDict

class GoodLoss:
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weight: float = 1.0

    def __init__(self, weight):
        self.weight = weight
"""


def test_discovery_does_not_import_and_build_does(fake_site):
    fake_site("fake-good", "0.3", {"detkit.loss": {"good_loss": "fake_good:GoodLoss"}}, {"fake_good.py": GOOD})
    entry = next(e for e in registry("loss") if e.name == "good_loss")
    assert entry.provider.distribution == "fake-good"
    assert entry.provider.version == "0.3"
    assert entry.status == "not loaded"
    assert "fake_good" not in sys.modules
    assert registry("loss").build({"type": "good_loss", "weight": 2}).weight == 2.0
    assert entry.status == "ok"


def test_broken_plugin_is_recorded_and_does_not_break_others(fake_site):
    fake_site("fake-good", "0.3", {"detkit.loss": {"good_loss": "fake_good:GoodLoss"}}, {"fake_good.py": GOOD})
    fake_site(
        "fake-broken",
        "9.9",
        {"detkit.loss": {"broken_loss": "fake_broken:Nope"}},
        {"fake_broken.py": "raise RuntimeError('boom at import')\n"},
    )
    entries = {e.name: e for e in plugins.load_all() if e.kind == "loss"}
    assert entries["broken_loss"].status == "failed: RuntimeError: boom at import"
    assert entries["good_loss"].status == "ok"
    # Building it fails with the plugin's own error, located at the component's `type`.
    with pytest.raises(ComponentValidationError) as info:
        registry("loss").build("broken_loss")
    assert info.value.errors == [
        (("type",), "loss 'broken_loss' from fake-broken 9.9 (fake_broken:Nope) failed to load: "
                    "RuntimeError: boom at import")
    ]
    with pytest.raises(PluginLoadError, match="boom at import"):
        registry("loss").get("broken_loss")
    assert registry("loss").build("good_loss").weight == 1.0


def test_duplicate_names_from_two_distributions(fake_site):
    fake_site("fake-good", "0.3", {"detkit.loss": {"dup_loss": "fake_good:GoodLoss"}}, {"fake_good.py": GOOD})
    fake_site("fake-other", "1.0", {"detkit.loss": {"dup_loss": "fake_other:GoodLoss"}}, {"fake_other.py": GOOD})
    with pytest.raises(RegistryError) as info:
        registry("loss").get("dup_loss")
    msg = str(info.value)
    assert "fake-good 0.3 (fake_good:GoodLoss)" in msg and "fake-other 1.0 (fake_other:GoodLoss)" in msg
    # A conflict on one name leaves the other losses usable.
    assert registry("loss").names().count("dup_loss") == 1


def test_autoload_can_be_disabled_and_allow_listed(fake_site, monkeypatch):
    fake_site("fake-good", "0.3", {"detkit.loss": {"good_loss": "fake_good:GoodLoss"}}, {"fake_good.py": GOOD})
    monkeypatch.setenv(plugins.ENV_DISABLE, "1")
    plugins.discover(force=True)
    names = registry("loss").names()
    assert "good_loss" not in names
    assert "smooth_l1" in names  # built-ins stay available
    monkeypatch.setenv(plugins.ENV_ALLOW, "fake-good")
    plugins.discover(force=True)
    assert "good_loss" in registry("loss").names()
