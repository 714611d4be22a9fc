"""YAML configs validated by pydantic.

A config has the top-level sections ``model``, ``data``, ``train`` and
``eval``; unknown keys are errors.  Every component (``{type: name, ...}``)
is validated against its plugin's parameter model while the file is loaded,
so a typo fails at once with its path (``model.rpn.proposal.nms_iou``) and
the file name.

``extends: base.yaml`` (or a list of files) merges the named files first,
relative to the extending file; mappings merge key by key and everything else
is replaced.  ``--set a.b.c=value`` overrides are applied last, the value read
as YAML.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from detkit.data.config import DataConfig
from detkit.engine.config import EvalConfig, TrainConfig
from detkit.errors import ConfigError
from detkit.registry import ComponentValidationError, DetectorSpec, flatten_validation_error, format_loc

EXTENDS_KEY = "extends"


class Config(BaseModel):
    """A whole run: what to build, on which data, how to train and evaluate."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    model: DetectorSpec
    data: DataConfig
    # Factories, not instances: a default trainer spec is validated (and its
    # plugin imported) only when a config is loaded, not when this module is.
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def read_yaml(path: Path) -> dict[str, Any]:
    """One YAML mapping from ``path``, or a ConfigError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``.

    Mappings merge key by key, except that a component whose ``type`` changes
    starts afresh (the old type's parameters would not fit the new one).
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        old = out.get(key)
        if (
            isinstance(old, dict)
            and isinstance(value, dict)
            and not ("type" in value and value.get("type") != old.get("type"))
        ):
            out[key] = merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The config mapping of ``path`` with its ``extends`` chain merged in."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise ConfigError(f"{path}: 'extends' forms a cycle: {cycle}")
    data = read_yaml(path)
    bases = data.pop(EXTENDS_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, load_raw(path.parent / base, (*_chain, resolved)))
    return merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.optimizer.lr=0.01"`` -> ``(["train", "optimizer", "lr"], 0.01)``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=3")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not valid YAML: take it as the literal string
    return key.split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                where = ".".join(keys[: i + 1])
                raise ConfigError(f"--set {text!r}: '{where}' is a {type(child).__name__}, not a section")
            node = child
        old = node.get(keys[-1])
        if isinstance(old, dict) and isinstance(value, dict):
            value = merge(old, value)
        node[keys[-1]] = value
    return data


def validate(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a config mapping; errors name ``source`` and each field's path."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(source, flatten_validation_error(exc))) from None
    except ComponentValidationError as exc:
        raise ConfigError(format_errors(source, exc.errors)) from None


def format_errors(source: str, errors: list[tuple[tuple, str]]) -> str:
    if len(errors) == 1:
        loc, msg = errors[0]
        return f"{source}: {format_loc(loc) or '<root>'}: {msg}"
    lines = [f"{source}: {len(errors)} invalid fields"]
    lines += [f"  {format_loc(loc) or '<root>'}: {msg}" for loc, msg in errors]
    return "\n".join(lines)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read, merge, override and validate the config at ``path``."""
    data = apply_overrides(load_raw(path), overrides)
    return validate(data, str(path))


def json_schema() -> dict[str, Any]:
    """JSON Schema of a config with every installed plugin's parameters."""
    from detkit.registry import load_all

    load_all()
    return Config.model_json_schema()
