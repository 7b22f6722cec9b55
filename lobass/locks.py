"""Exclusive file locks that say who holds them, and break only a lock whose holder is dead.

Concurrent sweep points that need the same artifact wait on its lock instead of building it
twice. A wait that lasts logs the holder (pid, host, since when), written into the lock file by
whoever holds it; a lock whose recorded holder died on this host while a child it forked keeps the
``flock`` is unlinked so that the next run locks a fresh file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


# A lock wait longer than this logs who holds the lock (then after twice as long, and so on).
LOCK_REPORT_AFTER_S = 5.0
_LOCK_POLL_S = 0.2


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block's duration.

    Concurrent sweep points that need the same artifact wait here instead of building it twice.
    The holder writes its pid, host, process start and the time it took the lock into the file.
    A wait longer than ``LOCK_REPORT_AFTER_S`` logs who holds it (a holder that is stopped or
    hung keeps everyone waiting until it is ended; the log says which process that is).

    The kernel releases a ``flock`` when the last descriptor of the locked file closes, so a
    killed holder frees the lock by itself. It stays held when the holder forked a process
    that inherited the descriptor and outlives it (a worker, a server): then the recorded
    holder is dead (on this host and in this PID namespace; its pid gone, a zombie, or reused
    by a process that started later) while the lock is still taken. Such a lock is stale: its
    file is unlinked, so the next process locks a fresh file, while the orphan keeps a lock that
    no one waits for. A holder on another host or in another container (a shared file system)
    cannot be checked and is waited for.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = _acquire_lock(path)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _acquire_lock(path: Path) -> IO[str]:
    """Open and lock ``path``, waiting, reporting and breaking stale locks as described above."""
    started = time.monotonic()
    report_at = LOCK_REPORT_AFTER_S
    while True:
        handle = open(path, "a+")  # noqa: SIM115  (returned open, closed by file_lock)
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                if _same_file(handle, path):
                    _record_lock_holder(handle)
                    return handle
                break  # the file was replaced (a stale lock broken) while we waited: reopen
            if not _same_file(handle, path):
                break
            holder = _lock_holder(path)
            if _holder_is_dead(holder):
                log.warning("breaking stale lock %s: its holder pid %s on %s (since %s) is dead "
                            "but a process it left behind still holds the lock", path,
                            holder.get("pid"), holder.get("host"), holder.get("since"))
                _unlink_if_same(path, handle)
                break
            waited = time.monotonic() - started
            if waited >= report_at:
                log.warning("waiting for lock %s: held by pid %s on %s since %s (%.0f s so far); "
                            "if that process is stopped or hung, ending it releases the lock",
                            path, holder.get("pid", "?"), holder.get("host", "?"),
                            holder.get("since", "?"), waited)
                report_at *= 2
            time.sleep(_LOCK_POLL_S)
        handle.close()


def _same_file(handle: IO[str], path: Path) -> bool:
    """Whether ``path`` still names the file that ``handle`` has open."""
    try:
        here, there = os.fstat(handle.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _record_lock_holder(handle: IO[str]) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "pidns": _pid_namespace(),
        "start": _process_start(os.getpid()),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }) + "\n")
    handle.flush()


def _lock_holder(path: Path) -> dict[str, Any]:
    """What the holder wrote into the lock file (empty while it is being written)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited: no start to match


def _pid_namespace() -> str | None:
    """The PID namespace of this process (Linux): containers may share a host name, not pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder_is_dead(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    here = (socket.gethostname(), _pid_namespace())
    if (holder.get("host"), holder.get("pidns")) != here or not isinstance(pid, int):
        return False  # another machine's (or container's) process, or not written yet: wait
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _process_start(pid)
    if start is None:  # a zombie, or gone since; without /proc (not Linux) it cannot be told
        return Path("/proc/self/stat").exists()
    return holder.get("start") is not None and start != holder["start"]  # pid reused


def _unlink_if_same(path: Path, handle: IO[str]) -> None:
    """Unlink the lock file ``handle`` has open, unless another waiter already replaced it.

    Waiters that find the same stale lock serialise on a second lock, held only for this
    check-and-unlink, so none of them unlinks the fresh file that another one already locked.
    """
    with open(path.with_name(path.name + ".break"), "a+") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            if _same_file(handle, path):
                path.unlink()
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
