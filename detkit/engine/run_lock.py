"""One training per run directory: a lock file held while a run trains.

Two runs writing into one directory would interleave ``metrics.jsonl`` and
overwrite each other's checkpoints.  The lock is ``.detkit.lock`` in the run
directory, locked with ``flock`` and holding the owner's PID and host.  The
kernel drops an ``flock`` when its holder dies, however it dies (``kill -9``
included), so a lock file left by a killed run is recognised as stale (the
file is there, nobody holds it) and taken over; no PID guessing is involved.
The file is removed when the run ends, normally or by an error.

``flock`` is local to one machine on some network file systems; two hosts
training into one NFS directory are not guarded against.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from detkit.errors import RunDirectoryError

LOCK_NAME = ".detkit.lock"


def _holder(path: Path) -> str:
    """``PID 123 on host`` as the lock file says (what a refused run names)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        text = []
    pid = text[0] if text else "?"
    host = f" on {text[1]}" if len(text) > 1 else ""
    return f"PID {pid}{host}"


def _refuse(run_dir: Path, path: Path) -> RunDirectoryError:
    return RunDirectoryError(
        f"{run_dir}: another training is running in this directory ({_holder(path)}, lock {path}); "
        "wait for it to end, or train into another directory with --out"
    )


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def check_unlocked(run_dir: Path) -> None:
    """Refuse early (before data and model are built) when a live run holds ``run_dir``."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (or no directory): nothing holds it
    try:
        if not _try_lock(fd):
            raise _refuse(Path(run_dir), path)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RunLock:
    """The lock of ``run_dir``: :meth:`acquire` takes it or raises :class:`RunDirectoryError`."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.took_over: str | None = None  # the holder named by a stale lock file

    def acquire(self) -> "RunLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                raise _refuse(self.run_dir, self.path)
            # The holder may have removed the file between our open and our lock:
            # then we hold a lock on a file nobody else can see; start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = os.read(fd, 256).decode("utf-8", errors="replace").split()
        self.took_over = f"PID {old[0]}" + (f" on {old[1]}" if len(old) > 1 else "") if old else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # removed while still held: nobody locks the old file meanwhile
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
