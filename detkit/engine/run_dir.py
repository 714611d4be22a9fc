"""The run directory: where a training writes, what it refuses, and preparing it.

A run directory holds one training (:class:`~detkit.engine.run_lock.RunLock`):
``config.yaml``, ``metrics.jsonl``, ``last.pt``, ``best.pt``, ``losses.png``,
``data_summary.txt``.  :func:`check_run_dir` runs before anything is built,
:func:`prepare_run_dir` once the config, data and model are, so a failed start
leaves nothing behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from detkit.config import Config
from detkit.engine.run_lock import LOCK_NAME, RunLock, check_unlocked
from detkit.errors import ConfigError, DetkitError, RunDirectoryError
from detkit.io import stale_temporaries


def say(console: Console, text: str) -> None:
    """One plain line (no markup, no highlighting, never wrapped mid-word)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def run_dir_for(cfg: Config, config_path: Path | None, out_dir: Path | None, resume: Path | None = None) -> Path:
    """``--out``; else the directory of the ``--resume`` checkpoint (the run it continues); else ``train.out_dir``."""
    if out_dir is not None:
        return Path(out_dir)
    if resume is not None:
        return Path(resume).parent
    name = cfg.name or (config_path.stem if config_path else "run")
    try:
        return Path(cfg.train.out_dir.format(name=name))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"train.out_dir: {cfg.train.out_dir!r} may only use the placeholder {{name}} ({exc})"
        ) from None


RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "losses.png", "config.yaml", "val_detections.json")


def _same_dir(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def check_run_dir(run_dir: Path, resume: Path | None, overwrite: bool) -> None:
    """Refuse a directory another training holds (always), and one that holds another run's
    checkpoints, unless this run continues it (``--resume`` from it) or ``overwrite`` replaces it."""
    check_unlocked(run_dir)
    continues = resume is not None and _same_dir(Path(resume).parent, run_dir)
    if continues or overwrite or not run_dir.is_dir():
        return
    held = sorted(p.name for p in run_dir.glob("*.pt"))
    if held:
        raise RunDirectoryError(
            f"{run_dir}: already holds a run ({', '.join(held)}); continue it with --resume "
            f"{run_dir / ('last.pt' if 'last.pt' in held else held[0])}, train into a new directory with "
            "--out, or replace it with --overwrite"
        )


def first_missing_dir(run_dir: Path) -> Path | None:
    """The outermost of ``run_dir`` and its parents that does not exist yet (what creating it makes);
    None when it exists."""
    path, missing = Path(run_dir).absolute(), None
    while not path.exists() and path != path.parent:
        path, missing = path.parent, path
    return missing


def clear_run_dir(run_dir: Path) -> None:
    """Remove what a start that failed wrote into the directory it created, while its lock is held
    (the lock file stays: releasing the lock removes it)."""
    for path in Path(run_dir).iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def remove_empty_dirs(run_dir: Path, top: Path) -> None:
    """``run_dir`` and its parents up to ``top``, each only if empty (another run may have come in)."""
    path, top = Path(run_dir).absolute(), Path(top).absolute()
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == top or path == path.parent:
            return
        path = path.parent


def prepare_run_dir(run_dir: Path, overwrite: bool, console: Console) -> RunLock:
    """Create the run directory and take its lock (returned, held); then, with ``overwrite``,
    remove the old run's files, and drop stale temporaries.  The lock comes first: neither
    ``overwrite`` nor the clean-up touches a directory another training holds."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DetkitError(f"{run_dir}: cannot create the run directory ({exc.strerror or exc})") from None
    lock = RunLock(run_dir).acquire()
    try:
        _clean_run_dir(run_dir, overwrite, console)
    except BaseException:
        lock.release()
        raise
    if lock.took_over:
        say(console, f"{run_dir}: took over the lock of a training that no longer runs ({lock.took_over})")
    return lock


def _clean_run_dir(run_dir: Path, overwrite: bool, console: Console) -> None:
    if overwrite:
        for path in [*run_dir.glob("*.pt"), *(run_dir / n for n in RUN_FILES)]:
            path.unlink(missing_ok=True)
    stale = stale_temporaries(run_dir)
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        say(console, f"removed {len(stale)} unfinished temporary file(s) of an interrupted save from {run_dir}")
