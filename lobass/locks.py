"""Exclusive file locks (``filelock``) that say who holds them, and break only a dead holder's.

Concurrent sweep points that need the same artifact wait on its lock instead of building it
twice. The lock itself is ``filelock.FileLock`` (``flock`` on POSIX). ``filelock`` cannot say who
holds a native lock (its ``pid`` exists only for the soft, marker-file fallback), so the holder
writes its own record (pid, host, process start, since when) into the lock file: a wait that
lasts logs that holder, and a lock whose recorded holder died on this host while a child it forked
keeps the ``flock`` is unlinked so that the next run locks a fresh file (``filelock`` refuses an
unlinked inode, so no one takes the orphan's file again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


# A lock wait longer than this logs who holds the lock (then after twice as long, and so on).
LOCK_REPORT_AFTER_S = 5.0
_LOCK_POLL_S = 0.2


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block's duration.

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
    lock = _acquire_lock(path)
    try:
        yield
    finally:
        lock.release()


def _acquire_lock(path: Path) -> FileLock:
    """Take ``path``'s lock, waiting, reporting and breaking stale locks as described above."""
    started = time.monotonic()
    report_at = LOCK_REPORT_AFTER_S
    # One lock object per call, shared by no thread and no other caller: each ``file_lock`` is
    # its own holder (filelock's per-thread reentrancy would let two threads in at once).
    try:
        lock = FileLock(path, thread_local=False, on_acquired=_record_lock_holder)
        hooked = True
    except TypeError:  # filelock < 4.3 (an older GPU image's) has no hook: write it by path
        lock, hooked = FileLock(path, thread_local=False), False
    while True:
        try:
            lock.acquire(timeout=_LOCK_POLL_S, poll_interval=_LOCK_POLL_S / 4)
        except Timeout:
            pass
        else:
            if not hooked:
                fd = os.open(path, os.O_RDWR)
                try:
                    _record_lock_holder(fd)
                finally:
                    os.close(fd)
            return lock
        try:
            seen = os.stat(path)
        except FileNotFoundError:
            continue  # a stale lock was just broken: take the fresh file
        holder = _lock_holder(path)
        if _holder_is_dead(holder):
            log.warning("breaking stale lock %s: its holder pid %s on %s (since %s) is dead "
                        "but a process it left behind still holds the lock", path,
                        holder.get("pid"), holder.get("host"), holder.get("since"))
            _unlink_if_same(path, seen)
            continue
        waited = time.monotonic() - started
        if waited >= report_at:
            log.warning("waiting for lock %s: held by pid %s on %s since %s (%.0f s so far); "
                        "if that process is stopped or hung, ending it releases the lock",
                        path, holder.get("pid", "?"), holder.get("host", "?"),
                        holder.get("since", "?"), waited)
            report_at *= 2


def _record_lock_holder(fd: int) -> None:
    """Write who holds the lock into the locked file (``filelock``'s ``on_acquired`` hook)."""
    record = json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "pidns": _pid_namespace(),
        "start": _process_start(os.getpid()),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)


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


def _unlink_if_same(path: Path, seen: os.stat_result) -> None:
    """Unlink the stale lock file ``seen``, unless another waiter already replaced it.

    Waiters that find the same stale lock serialise on a second lock, held only for this
    check-and-unlink, so none of them unlinks the fresh file that another one already locked.
    """
    guard = FileLock(path.with_name(path.name + ".break"), thread_local=False)
    with guard, contextlib.suppress(FileNotFoundError):
        if os.path.samestat(os.stat(path), seen) and _holder_is_dead(_lock_holder(path)):
            path.unlink()
