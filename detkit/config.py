"""YAML configs validated by pydantic.

A config has the top-level sections ``model``, ``data``, ``train`` and
``eval``; unknown keys are errors.  Every component (``{type: name, ...}``)
is validated against its plugin's parameter model while the file is loaded,
so a typo fails at once with its path (``model.rpn.proposal.nms_iou``) and
the file name.

``extends: base.yaml`` (or a list of files) merges the named files first,
relative to the extending file; mappings merge key by key and everything else
is replaced.  ``--set a.b.c=value`` overrides are applied last, the value read
as YAML.  Changing a component's ``type`` (in a file that extends another, or
with ``--set model.backbone.type=vgg16``) starts that component from the new
type's defaults: the old type's parameters would not fit it.

Errors name their real source: the file (and line) for YAML problems, the
extending file for a missing ``extends`` target, and ``--set KEY=VALUE`` for
a field an override set.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from detkit.data.config import DataConfig
from detkit.sections import EvalConfig, TrainConfig
from detkit.errors import ConfigError
from detkit.registry import ComponentValidationError, DetectorSpec, flatten_validation_error, format_loc

EXTENDS_KEY = "extends"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    Plain YAML keeps the last one silently, so a second ``train:`` section
    would replace the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                line = first.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if line is not None:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"duplicate key {key!r} on lines {line + 1} and {key_node.start_mark.line + 1} "
                    "(the second would silently replace the first)",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


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
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the config as UTF-8"
        ) from None
    try:
        data = safe_load(text)
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
        target = path.parent / base
        if not target.exists():
            raise ConfigError(f"{path}: '{EXTENDS_KEY}: {base}' names {target}, which does not exist")
        merged = merge(merged, load_raw(target, (*_chain, resolved)))
    return merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.optimizer.lr=0.01"`` -> ``(["train", "optimizer", "lr"], 0.01)``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=3")
    try:
        parsed = safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not valid YAML: take it as the literal string
    return key.split("."), parsed


def _sets_type(text: str) -> bool:
    key = text.partition("=")[0].strip()
    return key == "type" or key.endswith(".type")


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides; a new ``type`` resets its component to that type's defaults.

    Overrides of a ``type`` are applied first, so ``--set m.b.depth=50 --set
    m.b.type=resnet`` keeps the depth whatever the order on the command line.
    """
    data = copy.deepcopy(data)
    overrides = list(overrides)
    for text in [t for t in overrides if _sets_type(t)] + [t for t in overrides if not _sets_type(t)]:
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
        if keys[-1] == "type" and "type" in node and value != old:
            # Like `extends`: the old type's parameters would not fit the new one.
            node.clear()
        elif isinstance(old, dict) and isinstance(value, dict):
            # merge() resets a child whose type changes; do the same for this node.
            value = merge({} if "type" in value and value["type"] != old.get("type") else old, value)
        node[keys[-1]] = value
    return data


def validate(data: dict[str, Any], source: str = "<config>", overrides: Iterable[str] = ()) -> Config:
    """Validate a config mapping; errors name ``source`` and each field's path.

    A field that one of ``overrides`` set (or lies inside the section it set)
    is blamed on that ``--set`` instead of on ``source``.
    """
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = flatten_validation_error(exc)
    except ComponentValidationError as exc:
        errors = exc.errors
    raise ConfigError(format_errors(source, errors, overrides)) from None


def _blame(loc: tuple, overrides: list[str]) -> str | None:
    """The last ``--set`` whose key path is a prefix of ``loc`` (or that ``loc`` contains)."""
    parts = [str(p) for p in loc]
    for text in reversed(overrides):
        keys = text.partition("=")[0].strip().split(".")
        n = min(len(keys), len(parts))
        if n and keys[:n] == parts[:n]:
            return text
    return None


def format_errors(source: str, errors: list[tuple[tuple, str]], overrides: Iterable[str] = ()) -> str:
    overrides = list(overrides)
    blamed = [_blame(loc, overrides) for loc, _ in errors]

    def where(i: int) -> str:
        return f"--set {blamed[i]}" if blamed[i] else source

    if len(errors) == 1:
        loc, msg = errors[0]
        return f"{where(0)}: {format_loc(loc) or '<root>'}: {msg}"
    if all(blamed):
        head = "--set overrides"
    else:
        head = source + (" with --set overrides" if any(blamed) else "")
    lines = [f"{head}: {len(errors)} invalid fields"]
    lines += [
        f"  {format_loc(loc) or '<root>'}: {msg}" + (f"  (from --set {blamed[i]})" if blamed[i] else "")
        for i, (loc, msg) in enumerate(errors)
    ]
    return "\n".join(lines)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read, merge, override and validate the config at ``path``."""
    overrides = list(overrides)
    data = apply_overrides(load_raw(path), overrides)
    return validate(data, str(path), overrides)


def check_backbone(cfg: Config) -> None:
    """Build ``model.backbone`` and check that its real output matches what it declares.

    Without pretrained weights and with parameters on the meta device (no
    memory, no FLOPs; a plugin that cannot be built there is built on the
    CPU), then :func:`detkit.interfaces.check_backbone_output`, the check the
    detector makes when built: a mismatch, or a backbone that cannot be built,
    raises a one-line error naming the plugin.  A detector without a
    ``backbone`` component is not checked.
    """
    import torch

    from detkit.errors import PluginLoadError
    from detkit.interfaces import check_backbone_output
    from detkit.registry import registry, without_pretrained

    spec = cfg.model.to_dict().get("backbone")
    if not (isinstance(spec, dict) and isinstance(spec.get("type"), str)):
        return
    spec = without_pretrained(spec)
    backbones = registry("backbone")
    label = f"model.backbone '{spec['type']}' ({backbones.get(spec['type']).provider})"
    try:
        with torch.device("meta"):
            backbone = backbones.build(spec)
    except PluginLoadError:
        # Some constructors need real tensors: build it for real. A failure there is the
        # registry's one line naming the plugin and its distribution (exit 2).
        backbone = backbones.build(spec)
    check_backbone_output(backbone, label)


def _components(value: Any, loc: tuple) -> Iterator[tuple[tuple, Any]]:
    """Every component spec in a validated config, with its location."""
    from detkit.registry import ComponentSpec

    if isinstance(value, ComponentSpec):
        yield loc, value
        value = value.params
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _components(getattr(value, name), loc + (name,))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _components(item, loc + (i,))


def _missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package missing, or a module hidden as None
        return True


def check_requirements(cfg: Config, source: str = "<config>") -> None:
    """Refuse a config whose components need a package that is not installed, before anything is built.

    A component class declares ``requires = (("mlflow", "detkit[mlflow]"), ...)``: the module to
    find and what to ``pip install``.  ``train.tensorboard: true`` needs the ``tensorboard`` hook's.
    Not part of :func:`validate`: a checkpoint trained with a tracker stays readable where the
    tracker is not installed.
    """
    from detkit.registry import registry

    errors = []
    found = [(loc + ("type",), spec) for loc, spec in _components(cfg, ())]  # blame the field naming it
    if cfg.train.tensorboard and "tensorboard" in registry("hook"):
        found.append((("train", "tensorboard"), registry("hook").validate("tensorboard")))
    for field, spec in found:
        factory = registry(spec.kind).get(spec.type).factory
        for module, requirement in getattr(factory, "requires", ()):
            if _missing(module):
                errors.append((field, f"{spec.kind} '{spec.type}' needs the {module} package, which is not "
                                      f"installed: pip install '{requirement}'"))
    if errors:
        raise ConfigError(format_errors(source, errors))


def json_schema() -> dict[str, Any]:
    """JSON Schema of a config with every installed plugin's parameters."""
    from detkit.registry import load_all

    load_all()
    return Config.model_json_schema()
