"""One writer per cache: a lock file in the root of what is being written.

``precompute``, ``cache copy``, ``export-wds``, ``latent-stats`` and ``train`` (in its run folder) hold
:data:`LOCK_FILE` (``_lock.json``: host, pid, process start time, command, start time, a random
token) in their destination while they write,
and remove it when they finish or fail. A second writer finds it and is refused with one line that
names the holder. Readers never look at it: any number of them read a cache at once.

A lock left behind by a writer that died (SIGKILL, power loss) is taken over by the next writer on
the same host when its pid is no longer running (or now belongs to another process, told apart by
the process start time). A lock from another host is never taken over automatically (its pid means
nothing here): the message says which host holds it and that deleting the file is the way out once
that writer is known to be gone.

Creation is exclusive: ``O_CREAT | O_EXCL`` on local disk; on an object store a write-if-absent
(``open(..., "xb")``, a conditional PUT on S3 through s3fs) where the backend supports it. Where it
does not, the lock is written after an existence check and read back: two writers starting within
the same instant on such a store can both pass (documented in docs/cache-format.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from repa_cache.cache.errors import CacheError
from repa_cache.cache.storage import StorePath

LOCK_FILE = "_lock.json"
_TAKEOVER = "_lock.json.takeover"
_TAKEOVER_STALE_S = 60.0  # a takeover marker older than this was left by a writer killed mid-takeover
_MAX_LOCK_BYTES = 1 << 16  # ours are a few hundred bytes


class LockHeld(CacheError):
    """Another writer holds the lock of this destination."""


def _start_time(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot, from /proc) or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def lock_info(command: str) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _start_time(pid),
        "command": command,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }


def _shown(value: Any, limit: int = 80) -> str:
    """A lock field as it may appear in a message: one line of printable characters, cut short
    (the file may have been written by anyone)."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _holder(info: dict[str, Any]) -> str:
    return (f"{_shown(info.get('command', 'a writer'))} (host {_shown(info.get('host'))}, pid {_shown(info.get('pid'))}, "
            f"started {_shown(info.get('started_at'))})")


def is_stale(info: dict[str, Any]) -> bool:
    """True when the lock's writer is known to be gone: same host, and its pid no longer runs
    (or runs another process than the one that took the lock)."""
    if info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if not _pid_alive(pid):
        return True
    started = info.get("pid_start")
    now = _start_time(pid)
    return started is not None and now is not None and started != now


def _create_exclusive(path: StorePath, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; False when it exists."""
    if path.is_local:
        os.makedirs(os.path.dirname(path.path) or ".", exist_ok=True)
        try:
            fd = os.open(path.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    try:
        with path.fs.open(path.path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError, TypeError):  # the backend has no write-if-absent
        if path.exists():
            return False
        path.write_bytes(data)
        return True
    except OSError as e:
        if getattr(e, "errno", None) == errno.EEXIST or "PreconditionFailed" in str(e) or "412" in str(e):
            return False
        raise


def _read(path: StorePath) -> dict[str, Any] | None:
    """The lock's content; None when absent; {} when it cannot be parsed (half-written) or is
    larger than any lock this module writes (only its first bytes are read)."""
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_LOCK_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > _MAX_LOCK_BYTES:
        return {}
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _refuse(root: StorePath, info: dict[str, Any]) -> LockHeld:
    path = root / LOCK_FILE
    if not info:
        return LockHeld(f"{root} is locked by another writer ({path} is unreadable); if no writer is running, "
                        f"delete {path} and run again")
    if info.get("host") != socket.gethostname():
        return LockHeld(f"{root} is being written by {_holder(info)}; if that writer is gone, delete {path} and run again")
    return LockHeld(f"{root} is being written by {_holder(info)}; wait for it to finish (or stop it) and run again")


def _take_over(root: StorePath, stale: dict[str, Any], data: bytes) -> bool:
    """Replace a stale lock by ours; False when another writer got there first. A takeover marker
    (created exclusively) makes sure only one of several waiting writers replaces it."""
    marker = root / _TAKEOVER
    if not _create_exclusive(marker, data):
        with contextlib.suppress(OSError):
            if root.is_local and time.time() - os.path.getmtime(marker.path) > _TAKEOVER_STALE_S:
                marker.unlink()
        return False
    try:
        if _read(root / LOCK_FILE) != stale:  # changed since we judged it stale
            return False
        (root / LOCK_FILE).unlink()
        return _create_exclusive(root / LOCK_FILE, data)
    finally:
        marker.unlink()


def acquire(root: StorePath, command: str, quiet: bool = False) -> dict[str, Any]:
    """Take the lock of ``root`` (created if needed); LockHeld naming the holder when another writer has it.
    Taking over a stale lock is said on stderr unless ``quiet``."""
    root.mkdir()
    info = lock_info(command)
    data = json.dumps(info, indent=1, sort_keys=True).encode()
    path = root / LOCK_FILE
    for _ in range(3):
        if _create_exclusive(path, data):
            if not path.is_local and _read(path) != info:  # check-then-write store: someone else won
                raise _refuse(root, _read(path) or {})
            return info
        held = _read(path)
        if held is None:  # released between our attempt and the read: try again
            continue
        if not is_stale(held):
            raise _refuse(root, held)
        if not quiet:
            print(f"taking over the stale lock of {root} left by {_holder(held)}", file=sys.stderr)
        if _take_over(root, held, data):
            return info
    held = _read(path)
    raise _refuse(root, held or {})


def release(root: StorePath, info: dict[str, Any]) -> None:
    """Remove the lock if it is still ours (never another writer's)."""
    path = root / LOCK_FILE
    held = _read(path)
    if held is not None and held.get("token") == info.get("token"):
        path.unlink()


@contextlib.contextmanager
def writer_lock(root: StorePath, command: str, quiet: bool = False) -> Iterator[dict[str, Any]]:
    """Hold the lock of ``root`` for the duration of a ``with`` block. A local folder made for the
    lock alone is removed again when the block left nothing in it (a command refused before it
    wrote anything leaves no empty folder behind)."""
    created = root.is_local and not root.exists()
    info = acquire(root, command, quiet)
    try:
        yield info
    finally:
        release(root, info)
        if created and root.is_dir() and not any(root.iterdir()):
            root.local.rmdir()


def is_our_lock(path: StorePath) -> bool:
    """True when ``path`` is a lock file as this module writes it (so a folder holding only it is ours)."""
    info = _read(path)
    return bool(info) and {"host", "pid", "token"} <= set(info or {})


__all__ = ["LOCK_FILE", "LockHeld", "acquire", "is_our_lock", "is_stale", "release", "writer_lock"]
