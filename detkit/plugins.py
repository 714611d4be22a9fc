"""Finding plugins (metadata only) and loading them (importing code).

Every component, the built-in ones included, is declared as a Python entry
point in a group named ``detkit.<kind>``::

    [project.entry-points."detkit.backbone"]
    resnet18 = "my_detkit_plugin.backbones:ResNet18Backbone"

:func:`find_entry_points` reads those declarations from the installed
distributions' metadata without importing anything.  This module knows
nothing of the registries: :func:`detkit.registry.discover` asks it for the
entries and records them, an entry is imported when it is first built, or by
:func:`detkit.registry.load_all` (``detkit list-plugins --load``).  An import
that raises is recorded on its entry with its distribution and version and
never breaks other plugins or commands that do not use it.

Set ``DETKIT_DISABLE_PLUGIN_AUTOLOAD=1`` to skip third-party distributions;
``DETKIT_PLUGINS=dist-a,dist-b`` then names the ones to load anyway.  The
components that ship with detkit are always available.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import entrypoints

GROUP_PREFIX = "detkit."
ENV_DISABLE = "DETKIT_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "DETKIT_PLUGINS"
BUILTIN_DISTRIBUTION = "detkit"


@dataclass(frozen=True)
class Provider:
    """Where an entry comes from: a distribution and an import target."""

    distribution: str | None
    version: str | None
    target: str

    def __str__(self) -> str:
        if self.distribution:
            return f"{self.distribution} {self.version} ({self.target})"
        return self.target


@dataclass(frozen=True)
class FoundEntry:
    """One ``detkit.<kind>`` entry point, not imported; ``load()`` imports it."""

    kind: str
    name: str
    provider: Provider
    load: Callable[[], Any]


@dataclass(frozen=True)
class Found:
    """What :func:`find_entry_points` saw: usable entries and switched-off ones."""

    entries: list[FoundEntry]
    # Entries of distributions left out by DETKIT_DISABLE_PLUGIN_AUTOLOAD/DETKIT_PLUGINS,
    # so that asking for one says "disabled", not "unknown".
    disabled: list[FoundEntry]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed_distributions() -> set[str] | None:
    """None means every distribution; otherwise the allowed normalised names."""
    if os.environ.get(ENV_DISABLE, "").strip().lower() in ("", "0", "false", "no"):
        return None
    allowed = {_normalise(d) for d in os.environ.get(ENV_ALLOW, "").split(",") if d.strip()}
    return allowed | {BUILTIN_DISTRIBUTION}


def disabled_hint(provider: Provider) -> str:
    """How to turn a disabled distribution's plugins back on."""
    return (
        f"turned off: {ENV_DISABLE} is set and {ENV_ALLOW} does not name {provider.distribution}; "
        f"add it ({ENV_ALLOW}={provider.distribution}) or unset {ENV_DISABLE}"
    )


def find_entry_points(kinds: Iterable[str]) -> Found:
    """Every ``detkit.<kind>`` entry point on ``sys.path``, without importing any."""
    allowed = _allowed_distributions()
    entries: list[FoundEntry] = []
    disabled: list[FoundEntry] = []
    for kind in kinds:
        seen: set[tuple[str | None, str]] = set()
        try:
            group = entrypoints.get_group_all(GROUP_PREFIX + kind)
        except Exception as exc:  # a malformed entry_points.txt somewhere on sys.path
            warnings.warn(f"detkit: could not read the {GROUP_PREFIX + kind} entry points: {exc}", stacklevel=2)
            continue
        for ep in group:
            dist = ep.distro
            # dist-info folders spell names with underscores; show the project name.
            dist_name = _normalise(dist.name) if dist is not None else None
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
            found = FoundEntry(kind, ep.name, Provider(dist_name, version, target), ep.load)
            if allowed is not None and (dist_name or "") not in allowed:
                disabled.append(found)
            else:
                entries.append(found)
    return Found(entries, disabled)


@dataclass(frozen=True)
class UnknownGroup:
    """Entry points in a ``detkit.*`` group that names no kind this detkit knows."""

    group: str
    distribution: str
    version: str | None
    names: tuple[str, ...]

    def message(self, kinds: Iterable[str]) -> str:
        known = ", ".join(GROUP_PREFIX + k for k in kinds)
        return (
            f"warning: {self.distribution} {self.version or ''} declares entry points in the unknown group "
            f"'{self.group}' ({', '.join(self.names)}); they are ignored. Known groups: {known}"
        ).replace("  ", " ")


def unknown_groups(kinds: Iterable[str]) -> list[UnknownGroup]:
    """``detkit.*`` entry-point groups on ``sys.path`` that are not ``detkit.<kind>`` (metadata only).

    A misspelt group (``detkit.optimiser``) would otherwise hide a plugin without a word.
    """
    known = {GROUP_PREFIX + k for k in kinds}
    found: list[UnknownGroup] = []
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        try:
            name = _normalise(dist.metadata["Name"] or "?")
            eps = dist.entry_points
        except Exception:  # unreadable metadata: not ours to report here
            continue
        if name in seen:  # the same distribution twice on sys.path: the first one wins
            continue
        seen.add(name)
        groups: dict[str, list[str]] = {}
        for ep in eps:
            if ep.group.startswith(GROUP_PREFIX) and ep.group not in known:
                groups.setdefault(ep.group, []).append(ep.name)
        found += [UnknownGroup(g, name, dist.version, tuple(n)) for g, n in groups.items()]
    return sorted(found, key=lambda u: (u.distribution, u.group))
