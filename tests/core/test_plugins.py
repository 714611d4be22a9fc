"""Entry-point discovery with fake distributions on a temporary sys.path entry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from detkit import plugins
from detkit import registry as reg_module
from detkit.errors import PluginLoadError, RegistryError
from detkit.registry import ComponentValidationError, registry

GOOD = """
from pydantic import BaseModel, ConfigDict

class GoodLoss:
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weight: float = 1.0

    def __init__(self, params):
        self.weight = params.weight
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
    entries = {e.name: e for e in reg_module.load_all() if e.kind == "loss"}
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
    reg_module.discover(force=True)
    names = registry("loss").names()
    assert "good_loss" not in names
    assert "smooth_l1" in names  # built-ins stay available
    monkeypatch.setenv(plugins.ENV_ALLOW, "fake-good")
    reg_module.discover(force=True)
    assert "good_loss" in registry("loss").names()


def test_a_plugin_turned_off_by_the_allow_list_is_reported_as_disabled(fake_site, monkeypatch):
    fake_site("fake-good", "0.3", {"detkit.loss": {"good_loss": "fake_good:GoodLoss"}}, {"fake_good.py": GOOD})
    monkeypatch.setenv(plugins.ENV_DISABLE, "1")
    monkeypatch.setenv(plugins.ENV_ALLOW, "someone-else")
    reg_module.discover(force=True)
    with pytest.raises(RegistryError) as info:
        registry("loss").get("good_loss")
    msg = str(info.value)
    assert "unknown" not in msg
    assert "loss 'good_loss' from fake-good 0.3" in msg and "turned off" in msg
    assert "DETKIT_PLUGINS=fake-good" in msg
    assert "fake_good" not in sys.modules  # nothing imported to say so


def test_plugins_module_does_not_import_the_registry():
    """Finding entry points knows nothing of registries: no import cycle, no private writes."""
    import ast

    tree = ast.parse(Path(plugins.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not any(name.startswith("detkit.registry") for name in imported), imported
    assert "._entries" not in Path(plugins.__file__).read_text()
    code = "import sys, detkit.plugins; assert 'detkit.registry' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
