"""Files: atomic writes and safe reading of ``torch.save`` files.

The one place that writes run files and reads checkpoint files; the engine,
``detkit.data`` and plugins import it (a plugin never imports
``detkit.engine``).

Atomic writes go to a temporary file beside the target (``.<name>.<random>.tmp``)
and are renamed over it, so a crash, a ``kill -9`` or a full disk leaves the
previous file intact, never half of one.  The finished file gets the mode a
plain ``open()`` would give it (``0666`` minus the umask), not ``mkstemp``'s
private ``0600``, so a teammate or a container running as another user can
read ``best.pt``.

Files are read with ``torch.load(weights_only=True)``: a file whose pickle
would import and call arbitrary code is refused with a message that names
what it tries to import.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from detkit.errors import CheckpointError, OutputError

TMP_SUFFIX = ".tmp"


# ------------------------------------------------------------------ writing
def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(old)
    return old


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it over ``path``.

    The data is flushed to disk before the rename; on any error the temporary
    file is removed and the old ``path`` (if any) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file (results, configs) as UTF-8, atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path``, atomically."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def stale_temporaries(directory: str | Path) -> list[Path]:
    """Leftovers of atomic writes that were killed mid-write (``.<name>.*.tmp``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file())


def _creatable(directory: Path, option: str, shown: Path) -> None:
    """``directory`` exists as a writable directory or can be created (checked, not created)."""
    ancestor = directory
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{option} {shown}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {shown}: {ancestor} is not writable")


def check_output_file(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any slow work, an output file path that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a directory; name the file to write in it")
    _creatable(path.parent, option, path)
    return path


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any slow work, an output directory that is a file or cannot be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path}: is a file, not a directory")
    _creatable(path, option, path)
    return path


def make_output_dir(path: str | Path, option: str = "--out", given: str | Path | None = None) -> Path:
    """Create an output directory; failing (no permission, a read-only place) is an :class:`OutputError`
    naming ``given`` (what the user wrote: the file to write in it, by default the directory)."""
    path = Path(path)
    given = path if given is None else given
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {given}: {path} is a file, not a directory")
    _creatable(path, option, Path(given))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{option} {given}: cannot create {path} ({exc.strerror or exc})") from None
    return path


# ------------------------------------------------------------------ reading
def _pickle_globals(data: bytes, limit: int = 16) -> list[str]:
    """The ``module.name`` globals a pickle stream imports, found without running it."""
    found: list[str] = []
    strings: list[str] = []  # recent string pushes, for STACK_GLOBAL
    memo: dict[int, str] = {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                strings.append(memo[arg])
            if op.name == "STOP" or len(found) >= limit:
                break
    except Exception:  # a truncated or corrupt stream: keep what was found
        pass
    return list(dict.fromkeys(found))


def _unsafe_globals(path: Path) -> list[str]:
    """Globals in ``path`` that ``weights_only`` loading refuses (best effort, nothing runs)."""
    if zipfile.is_zipfile(path):
        getter = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        if getter is not None:
            try:
                return list(getter(str(path)))
            except Exception:
                return []
        return []
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 20)
    except OSError:
        return []
    if not head.startswith(b"\x80"):  # not a pickle at all
        return []
    safe = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "_codecs.encode")
    return [g for g in _pickle_globals(head) if not g.startswith(safe)]


_GLOBAL_RE = re.compile(r"unsupported GLOBAL\s+([\w.]+)", re.IGNORECASE)
CONVERT_HINT = (
    "if you trust where it came from, load it once with torch.load(path, weights_only=False) "
    "and torch.save only its tensors and plain values (e.g. the state_dict) to a new file"
)


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a ``torch.save`` file with ``weights_only=True``.

    A missing, corrupt or foreign file is a :class:`CheckpointError`; so is a
    file whose pickle would import code (``os.system``, a class of the program
    that wrote it): the message names that import and says how to convert a
    trusted file.  Nothing in the file is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols before refusing them; the error says enough.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    except (OSError, pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, TypeError) as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        match = _GLOBAL_RE.search(text)
        names = [match.group(1)] if match else _unsafe_globals(path)
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise CheckpointError(
                f"{path}: refused: loading this file would import and run {shown}, which a file of "
                f"weights never needs; detkit loads only tensors and plain values (weights_only=True). "
                f"To convert: {CONVERT_HINT}"
            ) from None
        lines = [l.strip() for l in text.splitlines() if l.strip()]
        # torch's own first line suggests weights_only=False, which detkit never does.
        detail = next((l for l in lines if l.startswith("Unsupported")), None)
        if detail is None:
            detail = "" if not lines or lines[0].startswith("Weights only load failed") else lines[0]
        # A file cut short (a copy or download that stopped) fails inside torch's zip
        # reader with an OSError or RuntimeError that names neither cause.
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint: truncated or corrupt ({detail or type(exc).__name__})"
        ) from None


def state_mismatches(
    own: dict[str, Any], theirs: dict[str, Any], name: Any = lambda key: key, shown: int = 8
) -> list[str]:
    """Missing keys, unexpected keys and wrong shapes between two state dicts.

    ``name`` turns a key into the spelling the user knows (their checkpoint's).
    Empty when ``theirs`` fits ``own``.
    """
    missing = sorted(name(k) for k in own.keys() - theirs.keys())
    unexpected = sorted(name(k) for k in theirs.keys() - own.keys())
    wrong = sorted(
        f"{name(k)} {tuple(getattr(theirs[k], 'shape', ()))} (model expects {tuple(own[k].shape)})"
        for k in own.keys() & theirs.keys()
        if tuple(getattr(theirs[k], "shape", ())) != tuple(own[k].shape)
    )
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
            problems.append(f"{label}: {', '.join(keys[:shown])}{more}")
    return problems


def load_model_state(model: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists the mismatches."""
    problems = state_mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(problems))
    model.load_state_dict(state)
