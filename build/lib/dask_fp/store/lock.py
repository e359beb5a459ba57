"""The single-writer lock: ``writer.lock`` in the store directory, naming its holder.

Created atomically with its full record (hard link of a temporary file); a
lock whose process is gone on this host is stale and cleared under a
``flock`` on the store directory; ``break_lock`` clears others on request.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import StoreError, StoreLockedError
from .schema import now

LOCK_NAME = "writer.lock"


def _lock_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": now(), "argv": _argv(),
            "pid_started": _process_started(os.getpid())}


def _argv() -> str:
    return " ".join(sys.argv)[:500]


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if unknown."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock holder's record, or None when the store is not locked."""
    try:
        return json.loads((path / LOCK_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "started": None, "argv": "unreadable lock file"}


def lock_is_stale(info: dict[str, Any]) -> bool:
    """A lock is stale when its holder ran on this host and that process is gone.

    "Gone" includes a zombie, and a pid that now belongs to a process started
    after the lock was taken (the pid was reused).
    """
    if info.get("host") != socket.gethostname() or not info.get("pid"):
        return False
    pid = int(info["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        started = info.get("pid_started")
        if started is not None and abs(proc.create_time() - float(started)) > 1.0:
            return True
    except ImportError:  # pragma: no cover - psutil comes with distributed
        return False
    except psutil.NoSuchProcess:  # it ended meanwhile
        return True
    except psutil.Error:  # e.g. access denied: it exists, so the lock is not stale
        return False
    return False


def describe_lock(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')} ({info.get('argv')})"


@contextmanager
def _local_guard(path: Path) -> Iterator[None]:
    """Serialise stale-lock removal among processes of this host (flock on the store directory).

    Without it, two new writers could both find the same stale lock, and the
    second could remove the fresh lock the first has just taken.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_if_stale(path: Path) -> dict[str, Any] | None:
    """Remove the lock if it is stale (checked again under the local guard); return its record."""
    with _local_guard(path):
        info = read_lock(path)
        if info is not None and lock_is_stale(info):
            (path / LOCK_NAME).unlink(missing_ok=True)
            return info
    return None


def _try_create_lock(path: Path) -> bool:
    """Create ``writer.lock`` with its full record in one step; False if it exists."""
    lock = path / LOCK_NAME
    tmp = path / f"{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(_lock_info()))
    try:
        try:
            os.link(tmp, lock)  # atomic, fails if the lock exists: never a half-written lock
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create instead
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
            return True
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def writer_lock(path: Path, *, wait: float = 0.0, poll: float = 0.5) -> Iterator[None]:
    """Hold the store's single-writer lock; stale locks of dead local processes are cleared.

    Parameters
    ----------
    wait : float
        Seconds to wait for another writer to finish (0: refuse at once).
    """
    lock = path / LOCK_NAME
    deadline = time.monotonic() + wait
    said = False
    while not _try_create_lock(path):
        old = _remove_if_stale(path)
        if old is not None:
            print(f"dask-fp: removed the stale lock of {describe_lock(old)}: that process is gone.",
                  file=sys.stderr)
            continue
        if time.monotonic() < deadline:
            if not said:
                print(f"dask-fp: {path} is being written by {describe_lock(read_lock(path) or {})};"
                      f" waiting up to {wait:g} s.", file=sys.stderr, flush=True)
                said = True
            time.sleep(poll)
            continue
        info = read_lock(path) or {}
        raise StoreLockedError(
            f"{path} is being written by another ingest: {describe_lock(info)}. Wait for it"
            f" (--wait SECONDS), or if that process is dead on another host, run `dask-fp unlock {path}`."
        )
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def break_lock(path: str | os.PathLike[str], *, force: bool = False) -> dict[str, Any] | None:
    """Remove a lock: at once if stale, otherwise only with ``force``. Returns the old record."""
    p = Path(path)
    if not p.is_dir():
        raise StoreError(f"{p}: no fingerprint store here (not a directory).")
    info = read_lock(p)
    if info is None:
        return None
    old = _remove_if_stale(p)
    if old is not None:
        return old
    if not force:
        raise StoreLockedError(
            f"{p} is locked by a live process ({describe_lock(info)}); use --force only if"
            " you are sure it is dead (e.g. it ran on another host)."
        )
    (p / LOCK_NAME).unlink(missing_ok=True)
    return info

