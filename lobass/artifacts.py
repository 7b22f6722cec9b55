"""Content-addressed artifacts: keys, atomic builds, manifests and locks.

Every stage writes into ``<artifacts_dir>/<stage>/<key>/`` where ``key`` hashes exactly the inputs
that change the result. A build happens in ``<key>.partial/`` (kept across crashes so a stage can
resume from what it left there) under an exclusive file lock, and is renamed into place only once a
manifest of every file's size and hash has been written. A directory without a valid manifest is
never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def fingerprint(obj: Any, length: int = 16) -> str:
    """Hash a JSON-serialisable object canonically (sorted keys) into a short hex key."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_manifest(directory: Path, meta: dict[str, Any]) -> None:
    """Record size and sha256 of every file under ``directory`` (except the manifest itself)."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    atomic_write_json(directory / MANIFEST, {"files": files, "meta": meta})


def is_complete(directory: Path) -> bool:
    """True when ``directory`` has a manifest and every listed file has its recorded size and hash.

    A truncated or edited artifact fails this check and is rebuilt rather than used.
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    for rel, info in manifest.get("files", {}).items():
        path = directory / rel
        if not path.is_file() or path.stat().st_size != info["size"]:
            return False
        if file_sha256(path) != info["sha256"]:
            return False
    return True


def read_meta(directory: Path) -> dict[str, Any]:
    """The ``meta`` block that the builder stored in the manifest."""
    meta: dict[str, Any] = json.loads((directory / MANIFEST).read_text())["meta"]
    return meta


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block's duration.

    Concurrent sweep points that need the same artifact wait here instead of building it twice.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_artifact(
    directory: Path,
    build: Callable[[Path], dict[str, Any]],
) -> tuple[Path, bool]:
    """Return ``(directory, reused)``, building the artifact first when it is missing or invalid.

    Args:
        directory: final location ``<artifacts_dir>/<stage>/<key>``.
        build: called with the ``.partial`` work directory; writes its files there and returns
            the metadata to store in the manifest. The work directory survives a crash, so a
            builder may resume from what it finds there.

    Returns:
        The artifact directory and whether an existing complete artifact was reused.

    """
    if is_complete(directory):
        return directory, True
    with file_lock(directory.with_name(directory.name + ".lock")):
        if is_complete(directory):  # another process finished it while we waited
            return directory, True
        if directory.exists():
            log.warning("artifact %s is incomplete or corrupt; rebuilding it", directory)
            shutil.rmtree(directory)
        work = directory.with_name(directory.name + ".partial")
        work.mkdir(parents=True, exist_ok=True)
        meta = build(work)
        write_manifest(work, meta)
        os.replace(work, directory)
    return directory, False
