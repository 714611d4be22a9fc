"""Finding plugins (metadata only) and loading them (importing code).

Every component, the built-in ones included, is declared as a Python entry
point in a group named ``detkit.<kind>``::

    [project.entry-points."detkit.backbone"]
    resnet18 = "my_detkit_plugin.backbones:ResNet18Backbone"

:func:`discover` reads those declarations from the installed distributions'
metadata without importing anything; an entry is imported when it is first
built, or by :func:`load_all` (``detkit list-plugins --load``).  An import that
raises is recorded on its entry with its distribution and version and never
breaks other plugins or commands that do not use it.

Set ``DETKIT_DISABLE_PLUGIN_AUTOLOAD=1`` to skip third-party distributions;
``DETKIT_PLUGINS=dist-a,dist-b`` then names the ones to load anyway.  The
components that ship with detkit are always available.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings

import entrypoints

from detkit.registry import REGISTRIES, Entry, Provider

GROUP_PREFIX = "detkit."
ENV_DISABLE = "DETKIT_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "DETKIT_PLUGINS"
BUILTIN_DISTRIBUTION = "detkit"

_discovered = False


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed_distributions() -> set[str] | None:
    """None means every distribution; otherwise the allowed normalised names."""
    if os.environ.get(ENV_DISABLE, "").strip().lower() in ("", "0", "false", "no"):
        return None
    allowed = {_normalise(d) for d in os.environ.get(ENV_ALLOW, "").split(",") if d.strip()}
    return allowed | {BUILTIN_DISTRIBUTION}


def discover(force: bool = False) -> None:
    """Record every ``detkit.<kind>`` entry point on ``sys.path`` (no imports).

    ``force`` forgets earlier discoveries (not in-process registrations) and
    reads the metadata again, for example after ``sys.path`` changed.
    """
    global _discovered
    if _discovered and not force:
        return
    _discovered = True
    if force:
        for reg in REGISTRIES.values():
            for entry in list(reg._entries.values()):
                if entry._load is not None:
                    reg.remove(entry.name)
    allowed = _allowed_distributions()
    for kind, reg in REGISTRIES.items():
        seen: set[tuple[str | None, str]] = set()
        try:
            found = entrypoints.get_group_all(GROUP_PREFIX + kind)
        except Exception as exc:  # a malformed entry_points.txt somewhere on sys.path
            warnings.warn(f"detkit: could not read the {GROUP_PREFIX + kind} entry points: {exc}", stacklevel=2)
            continue
        for ep in found:
            dist = ep.distro
            # dist-info folders spell names with underscores; show the project name.
            dist_name = _normalise(dist.name) if dist is not None else None
            if allowed is not None and (dist_name or "") not in allowed:
                continue
            target = f"{ep.module_name}:{ep.object_name}" if ep.object_name else ep.module_name
            # The same distribution can appear twice on sys.path (an editable
            # install and a copy); the first one wins, as for imports.
            key = (dist_name, ep.name)
            if key in seen:
                continue
            seen.add(key)
            version = dist.version if dist is not None else None
            if dist_name and not version:
                # An .egg-info folder (a source checkout on sys.path) carries no
                # version in its name; ask the installed metadata instead.
                try:
                    version = importlib.metadata.version(dist_name)
                except importlib.metadata.PackageNotFoundError:
                    version = None
            provider = Provider(dist_name, version, target)
            reg.add_lazy(ep.name, provider, ep.load)


def load_all() -> list[Entry]:
    """Import every discovered entry; failures are recorded on the entries."""
    discover()
    entries: list[Entry] = []
    for reg in REGISTRIES.values():
        for entry in reg:
            reg.load(entry)
            entries.append(entry)
    return entries


def all_entries(kind: str | None = None) -> list[Entry]:
    """Every known entry (loaded or not), optionally of one kind."""
    discover()
    kinds = [kind] if kind else list(REGISTRIES)
    return [entry for k in kinds for entry in REGISTRIES[k]]
