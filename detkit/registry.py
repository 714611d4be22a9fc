"""One registry per kind of component, and the config type that names one.

A registered entry is a *name*, a *factory* (usually an ``nn.Module`` class) and
the pydantic model of its parameters, found as the factory's ``Params``
attribute.  A component is written in a config as ``{type: <name>, ...params}``;
:meth:`Registry.validate` checks the params against the plugin's model and
returns a :class:`ComponentSpec`, and :meth:`Registry.build` constructs it.

Values that only exist at run time (the number of classes, the backbone's
channel count) are passed to ``build`` as keyword arguments, never written in
the config.  A component whose parameters contain other components receives
them as :class:`ComponentSpec` objects and builds them with ``spec.build(...)``,
so nested components are built recursively with the run-time values their
parent knows.

Entries come from Python entry points, found by :mod:`detkit.plugins` and
recorded here by :func:`discover` (the only direction of import between the
two modules); they are imported on first use, or from :meth:`Registry.register` for code that lives in
the running program (tests, notebooks).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterator, Mapping

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError, core_schema

from detkit.errors import DetkitError, PluginLoadError, RegistryError
from detkit.plugins import Provider, disabled_hint, find_entry_points

KINDS: tuple[str, ...] = (
    "backbone",
    "neck",
    "proposal_generator",
    "roi_head",
    "pooler",
    "box_head",
    "target_creator",
    "loss",
    "detector",
    "trainer",
    "dataset",
    "evaluator",
    "hook",
    "optimizer",
    "lr_scheduler",
    "transform",
)


@dataclass
class Entry:
    """One registered component. ``factory``/``params`` are set once loaded."""

    kind: str
    name: str
    provider: Provider
    factory: Callable[..., Any] | None = None
    params: type[BaseModel] | None = None
    error: str | None = None
    conflicts: list[Provider] = field(default_factory=list)
    _load: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def loaded(self) -> bool:
        return self.factory is not None

    @property
    def status(self) -> str:
        if self.conflicts:
            return "conflict: also provided by " + ", ".join(map(str, self.conflicts))
        if self.error:
            return f"failed: {self.error}"
        return "ok" if self.loaded else "not loaded"


class ComponentValidationError(RegistryError):
    """Invalid component parameters; ``errors`` holds ``(loc, message)`` pairs."""

    def __init__(self, errors: list[tuple[tuple[str | int, ...], str]]):
        self.errors = errors
        super().__init__("; ".join(f"{format_loc(loc) or '<root>'}: {msg}" for loc, msg in errors))


def format_loc(loc: tuple[str | int, ...]) -> str:
    """``("model", "rpn", "nms_iou")`` -> ``model.rpn.nms_iou``; list indices as ``[i]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def flatten_validation_error(exc: ValidationError, prefix: tuple = ()) -> list[tuple[tuple, str]]:
    """Turn a pydantic error (with nested component errors) into ``(loc, message)`` pairs."""
    out: list[tuple[tuple, str]] = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(err["loc"])
        nested = (err.get("ctx") or {}).get("detkit_errors")
        if err["type"] == "detkit_component" and nested is not None:
            out.extend((loc + tuple(sub), msg) for sub, msg in nested)
        else:
            out.append((loc, err["msg"]))
    return out


@dataclass(frozen=True)
class ComponentSpec:
    """A validated ``{type: name, ...params}``: what to build, not yet built."""

    kind: str
    type: str
    params: BaseModel

    def build(self, **runtime: Any) -> Any:
        return registry(self.kind).build(self, **runtime)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.params.model_dump(mode="json")}


class Registry:
    """The components of one kind, by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._disabled: dict[str, Provider] = {}  # turned off by DETKIT_PLUGINS

    # ----------------------------------------------------------- registration
    def register(
        self, name: str | None = None, *, params: type[BaseModel] | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a factory from running code (tests, notebooks)."""

        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            target = f"{factory.__module__}:{factory.__qualname__}"
            self.add(name or factory.__name__, factory, params, Provider(None, None, target))
            return factory

        return deco

    def add(
        self,
        name: str,
        factory: Callable[..., Any],
        params: type[BaseModel] | None = None,
        provider: Provider | None = None,
    ) -> Entry:
        provider = provider or Provider(None, None, f"{factory.__module__}:{factory.__qualname__}")
        existing = self._entries.get(name)
        if existing is not None and existing.provider != provider:
            raise RegistryError(
                f"duplicate {self.kind} '{name}': provided by {existing.provider} and by {provider}"
            )
        entry = Entry(self.kind, name, provider)
        self._set_factory(entry, factory, params)
        self._entries[name] = entry
        return entry

    def add_lazy(self, name: str, provider: Provider, load: Callable[[], Any]) -> Entry:
        """Record an entry point without importing it. Same provider twice is one entry."""
        existing = self._entries.get(name)
        if existing is not None:
            if existing.provider.distribution != provider.distribution or (
                existing.provider.target != provider.target
            ):
                if provider not in existing.conflicts:
                    existing.conflicts.append(provider)
            return existing
        entry = Entry(self.kind, name, provider, _load=load)
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def add_disabled(self, name: str, provider: Provider) -> None:
        """Remember an entry point whose distribution is switched off, to say so if asked."""
        self._disabled.setdefault(name, provider)

    def forget_discovered(self) -> None:
        """Drop what entry points brought (not in-process registrations)."""
        self._entries = {n: e for n, e in self._entries.items() if e._load is None}
        self._disabled.clear()

    def _set_factory(
        self, entry: Entry, factory: Callable[..., Any], params: type[BaseModel] | None
    ) -> None:
        params = params if params is not None else getattr(factory, "Params", None)
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise RegistryError(
                f"{self.kind} '{entry.name}' from {entry.provider} has no parameter model: "
                "give the factory a pydantic `Params` class attribute"
            )
        entry.factory, entry.params = factory, params

    # ---------------------------------------------------------------- lookup
    def __contains__(self, name: str) -> bool:
        discover()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        discover()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        discover()
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        """The loaded entry called ``name``; imports its plugin on first use."""
        discover()
        entry = self._entries.get(name)
        if entry is None:
            raise RegistryError(self._unknown_message(name))
        if entry.conflicts:
            others = " and by ".join(map(str, entry.conflicts))
            raise RegistryError(
                f"duplicate {self.kind} '{name}': provided by {entry.provider} and by {others}; "
                "uninstall one of them"
            )
        self.load(entry)
        if entry.error:
            raise PluginLoadError(
                f"{self.kind} '{name}' from {entry.provider} failed to load: {entry.error}"
            )
        return entry

    def load(self, entry: Entry) -> None:
        """Import a lazily discovered entry, recording (not raising) a failure."""
        if entry.loaded or entry.error or entry._load is None:
            return
        try:
            factory = entry._load()
            self._set_factory(entry, factory, None)
        except Exception as exc:  # a broken plugin must not break anything else
            entry.error = f"{type(exc).__name__}: {exc}"

    def _unknown_message(self, name: str) -> str:
        if name in self._disabled:
            provider = self._disabled[name]
            return f"{self.kind} '{name}' from {provider} is {disabled_hint(provider)}"
        installed = sorted(self._entries)
        close = difflib.get_close_matches(name, installed, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(installed) if installed else "none"
        return (
            f"unknown {self.kind} '{name}'.{hint} Installed {self.kind}s: {listing}. "
            "Run `detkit list-plugins` to see where they come from."
        )

    # ------------------------------------------------------ validate / build
    def validate(self, cfg: Any, role: str | None = None) -> ComponentSpec:
        """Check ``{type: name, ...params}`` against the plugin's model.

        Raises :class:`ComponentValidationError` with the location of each problem.
        A bare string is shorthand for ``{type: <string>}``.  ``role`` narrows the
        kind (a trainer's box loss vs its classification loss): a factory that
        declares another ``role`` class attribute is refused; one that declares
        none is accepted.
        """
        if isinstance(cfg, ComponentSpec):
            if cfg.kind != self.kind:
                raise ComponentValidationError([((), f"expected a {self.kind}, got a {cfg.kind}")])
            return cfg
        if isinstance(cfg, str):
            cfg = {"type": cfg}
        if not isinstance(cfg, Mapping):
            raise ComponentValidationError(
                [((), f"expected a {self.kind} as a mapping with a 'type' key, got {type(cfg).__name__}")]
            )
        if "type" not in cfg:
            names = ", ".join(self.names()) or "none installed"
            raise ComponentValidationError([(("type",), f"missing; choose a {self.kind}: {names}")])
        name = cfg["type"]
        if not isinstance(name, str):
            raise ComponentValidationError([(("type",), f"must be a name, got {name!r}")])
        try:
            entry = self.get(name)
        except (RegistryError, PluginLoadError) as exc:
            raise ComponentValidationError([(("type",), str(exc))]) from None
        declared = getattr(entry.factory, "role", None)
        if role is not None and declared is not None and declared != role:
            for other in self:  # only on this error path: import the kind to name what fits
                self.load(other)
            fitting = [e.name for e in self if e.loaded and getattr(e.factory, "role", None) == role]
            hint = f" ({', '.join(fitting)})" if fitting else ""
            raise ComponentValidationError(
                [(("type",), f"{self.kind} '{name}' has the role '{declared}'; this field takes "
                             f"the role '{role}'{hint}")]
            )
        params = {k: v for k, v in cfg.items() if k != "type"}
        try:
            model = entry.params.model_validate(params)  # type: ignore[union-attr]
        except ValidationError as exc:
            raise ComponentValidationError(flatten_validation_error(exc)) from None
        return ComponentSpec(self.kind, name, model)

    def build(self, cfg: Any, **runtime: Any) -> Any:
        """Validate ``cfg`` if needed and call ``factory(params, **runtime)``.

        The one constructor path: every factory takes its validated ``Params``
        instance first (validated once, here or where the config was loaded)
        and the run-time values (``num_classes``, ``model``...) as keywords.
        An exception raised inside a plugin's constructor that is not already
        a :class:`DetkitError` is wrapped in a :class:`PluginLoadError` naming
        the plugin and its distribution (the original stays as ``__cause__``).
        """
        spec = self.validate(cfg)
        entry = self.get(spec.type)
        clash = sorted(type(spec.params).model_fields.keys() & runtime.keys())
        if clash:
            raise RegistryError(
                f"{self.kind} '{spec.type}': {', '.join(clash)} is set by the program and "
                "cannot also be a config parameter"
            )
        try:
            return entry.factory(spec.params, **runtime)  # type: ignore[misc]
        except DetkitError:
            raise
        except Exception as exc:
            raise PluginLoadError(
                f"{self.kind} '{spec.type}' from {entry.provider} failed while being built: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def json_schema_union(self) -> Any:
        """A type whose JSON Schema is the union of every loaded plugin's parameters."""
        from typing import Literal, Union

        from pydantic import create_model

        variants = []
        for entry in self:
            self.load(entry)
            if entry.params is None:
                continue
            variants.append(
                create_model(
                    f"{self.kind}_{entry.name}",
                    __base__=entry.params,
                    type=(Literal[entry.name], ...),  # type: ignore[valid-type]
                )
            )
        if not variants:
            return dict
        return variants[0] if len(variants) == 1 else Union[tuple(variants)]  # type: ignore[return-value]


REGISTRIES: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}


def registry(kind: str) -> Registry:
    """The registry of ``kind``; an unknown kind is an error listing the known ones."""
    try:
        return REGISTRIES[kind]
    except KeyError:
        raise RegistryError(f"unknown component kind '{kind}'; known kinds: {', '.join(REGISTRIES)}") from None


def add_kind(kind: str) -> Registry:
    """Create the registry for a new kind (for plugins that bring one)."""
    return REGISTRIES.setdefault(kind, Registry(kind))


def without_pretrained(section: Any) -> Any:
    """A copy of a component mapping with every ``pretrained`` parameter cleared.

    Weights about to be loaded from a checkpoint make ImageNet initialisation
    pointless, and the file it named may not exist on this machine.
    """
    if isinstance(section, dict):
        return {k: (None if k == "pretrained" else without_pretrained(v)) for k, v in section.items()}
    if isinstance(section, list):
        return [without_pretrained(v) for v in section]
    return section


def build_detector(model: Mapping[str, Any], num_classes: int) -> Any:
    """Build the detector of a resolved ``model`` section without ImageNet weights.

    For weights that come from elsewhere (a checkpoint, an import) or are not
    needed (anchor statistics).
    """
    return registry("detector").build(without_pretrained(dict(model)), num_classes=num_classes)


_discovered = False


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
            reg.forget_discovered()
    found = find_entry_points(list(REGISTRIES))
    for ep in found.entries:
        REGISTRIES[ep.kind].add_lazy(ep.name, ep.provider, ep.load)
    for ep in found.disabled:
        REGISTRIES[ep.kind].add_disabled(ep.name, ep.provider)


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


class Component:
    """Pydantic annotation: the field holds a component of ``kind``.

    ``backbone: Annotated[ComponentSpec, Component("backbone")]`` accepts
    ``{type: vgg16, ...}`` (or just ``vgg16``), validates it with that plugin's
    model at load time, and dumps back to the same mapping.  With a ``role``
    (``Component("loss", role="box")``) a plugin that declares another role is
    refused at load time instead of failing on its first call.
    """

    def __init__(self, kind: str, role: str | None = None):
        self.kind = kind
        self.role = role

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        kind, role = self.kind, self.role

        def validate(value: Any) -> ComponentSpec:
            try:
                return registry(kind).validate(value, role)
            except ComponentValidationError as exc:
                raise PydanticCustomError(
                    "detkit_component", "{summary}", {"summary": str(exc), "detkit_errors": exc.errors}
                ) from None

        return core_schema.no_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda s: s.to_dict()),
        )

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> Any:
        union = registry(self.kind).json_schema_union()
        return handler(TypeAdapter(union).core_schema)


BackboneSpec = Annotated[ComponentSpec, Component("backbone")]
NeckSpec = Annotated[ComponentSpec, Component("neck")]
ProposalGeneratorSpec = Annotated[ComponentSpec, Component("proposal_generator")]
RoIHeadSpec = Annotated[ComponentSpec, Component("roi_head")]
PoolerSpec = Annotated[ComponentSpec, Component("pooler")]
BoxHeadSpec = Annotated[ComponentSpec, Component("box_head")]
AnchorTargetSpec = Annotated[ComponentSpec, Component("target_creator", role="anchor")]
ProposalTargetSpec = Annotated[ComponentSpec, Component("target_creator", role="proposal")]
BoxLossSpec = Annotated[ComponentSpec, Component("loss", role="box")]
ClassLossSpec = Annotated[ComponentSpec, Component("loss", role="classification")]
TargetCreatorSpec = Annotated[ComponentSpec, Component("target_creator")]
LossSpec = Annotated[ComponentSpec, Component("loss")]
DetectorSpec = Annotated[ComponentSpec, Component("detector")]
TrainerSpec = Annotated[ComponentSpec, Component("trainer")]
DatasetSpec = Annotated[ComponentSpec, Component("dataset")]
EvaluatorSpec = Annotated[ComponentSpec, Component("evaluator")]
