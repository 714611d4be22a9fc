"""Shared fixtures: fake plugin distributions and isolated registries."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from detkit import registry as plugin_registry
from detkit.registry import REGISTRIES

# Two cores: keep torch from oversubscribing when tests run beside other work.
torch.set_num_threads(min(2, torch.get_num_threads()))


def write_distribution(
    root: Path, dist: str, version: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]
) -> Path:
    """Lay out an installed distribution (dist-info + modules) under ``root``."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for rel, code in modules.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
    return root


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A temporary directory on sys.path for fake distributions; rediscovers after."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(dist, version, entry_points, modules):
        write_distribution(site, dist, version, entry_points, modules)
        plugin_registry.discover(force=True)

    yield make
    # Forget the fake modules and entries so other tests see the real install.
    for name in list(sys.modules):
        if name.startswith("fake_"):
            del sys.modules[name]
    monkeypatch.undo()
    plugin_registry.discover(force=True)


@pytest.fixture
def clean_registry():
    """Snapshot every registry and restore it after the test."""
    # Discover first: a snapshot taken before discovery would restore empty
    # registries that are marked as discovered, hiding the installed plugins.
    plugin_registry.discover()
    saved = {kind: dict(reg._entries) for kind, reg in REGISTRIES.items()}
    yield
    for kind, reg in REGISTRIES.items():
        reg._entries = saved[kind]
