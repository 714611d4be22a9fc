"""Data paths: relative to the working directory when given, absolute once stored.

A data set's file and directory parameters are declared with
:func:`path_field`.  A relative path is read against the working directory
of the command that was given it; ``detkit train`` stores the resolved
absolute paths in the run's ``config.yaml`` and checkpoints
(:func:`absolute_data_paths`), so ``eval``, ``predict`` and ``--resume`` work
from any directory.  A path that is missing is reported with
:func:`where`, which says what was written and what it was resolved against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

PATH_MARK = "detkit_path"


def path_field(*args: Any, **kwargs: Any) -> Any:
    """A pydantic ``Field`` marked as a data path (made absolute when a run stores its config)."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra[PATH_MARK] = True
    return Field(*args, json_schema_extra=extra, **kwargs)


def resolve(value: str | Path) -> Path:
    """``value`` with ``~`` expanded and, if relative, joined to the working directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def where(field: str, value: str | Path) -> str:
    """How ``value`` of ``field`` became a path, for error messages."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return f"{field}: {value}"
    return f"{field}: {str(value)!r} resolved against the working directory {Path.cwd()}"


def _is_path_field(model: type[BaseModel], name: str) -> bool:
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(PATH_MARK))


def _absolute(value: Any) -> Any:
    from detkit.registry import ComponentSpec

    if isinstance(value, ComponentSpec):
        return ComponentSpec(value.kind, value.type, _absolute(value.params))
    if isinstance(value, BaseModel):
        update = {}
        for name in type(value).model_fields:
            v = getattr(value, name)
            if isinstance(v, str) and _is_path_field(type(value), name):
                if v and not Path(v).expanduser().is_absolute():
                    update[name] = str(resolve(v))
            elif isinstance(v, (BaseModel, ComponentSpec, list, tuple)):
                new = _absolute(v)
                if new is not v:
                    update[name] = new
        return value.model_copy(update=update) if update else value
    if isinstance(value, (list, tuple)):
        new = [_absolute(v) for v in value]
        return type(value)(new) if any(a is not b for a, b in zip(new, value)) else value
    return value


def absolute_data_paths(cfg: Any) -> Any:
    """``cfg`` (a :class:`detkit.config.Config`) with every relative data path made absolute."""
    data = _absolute(cfg.data)
    return cfg if data is cfg.data else cfg.model_copy(update={"data": data})
