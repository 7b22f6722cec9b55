"""Content-addressed artifacts: keys, atomic builds, manifests, and the one publish routine.

Every stage writes into ``<artifacts_dir>/<stage>/<key>/`` where ``key`` hashes exactly the inputs
that change the result. A build happens in ``<key>.partial/`` (kept across crashes so a stage can
resume from what it left there) under an exclusive file lock, and is renamed into place only once a
manifest of every file's size and hash has been written. A directory without a valid manifest is
never used. The lock itself is :mod:`lobass.locks`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lobass import distributed
from lobass.jsonrows import jsonl_text, read_jsonl
from lobass.locks import file_lock

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


HASH_CACHE = "file_hashes.json"  # the file-hash cache kept in models_dir (cached_sha256s)


def cached_sha256s(paths: Sequence[Path], cache_file: Path) -> dict[Path, str]:
    """SHA-256 of each file, re-read only when its size, mtime, ctime or inode changed.

    Why: a model is keyed by the content of its weight files, and a 7B checkpoint takes a minute
    to hash; this cache (a small JSON file, updated under a lock) makes a rerun with unchanged
    files cost a ``stat`` per file. A write into a file changes its mtime and ctime (and
    ``touch -d`` cannot set ctime back), so an edited file is always hashed again.

    Args:
        paths: files to hash (symbolic links are followed, as a loader would).
        cache_file: the cache, ``<models_dir>/file_hashes.json`` in the pipeline.

    Returns:
        Each path's hex digest.

    """
    def stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def load() -> dict[str, Any]:
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):  # absent or torn: the hashes are recomputed
            return {}
        return cached if isinstance(cached, dict) else {}

    cache = load()
    found: dict[Path, str] = {}
    for path in paths:
        entry = cache.get(str(path.resolve()))
        if isinstance(entry, dict) and entry.get("stamp") == stamp(path):
            found[path] = str(entry["sha256"])
    missing = [p for p in paths if p not in found]
    if not missing:
        return found
    size = sum(p.stat().st_size for p in missing)
    if size > 1 << 30:  # a checkpoint's shards: say why the run pauses, once
        log.info("hashing %d files (%.1f GiB) for their cache key, once; kept in %s",
                 len(missing), size / (1 << 30), cache_file)
    fresh = {}
    for path in missing:
        before = stamp(path)
        digest = file_sha256(path)
        found[path] = digest
        if stamp(path) == before:  # not cached when the file changed while it was read
            fresh[str(path.resolve())] = {"stamp": before, "sha256": digest}
    with file_lock(cache_file.with_name(cache_file.name + ".lock")):  # other runs update it too
        atomic_write_json(cache_file, {**load(), **fresh})
    return found


def check_output_dirs(run_dir: Path, artifacts_dir: Path, models_dir: Path) -> None:
    """Refuse an ``artifacts_dir``/``models_dir`` that is a file, and a run dir in an artifact.

    Why: an artifact that is not exactly what its manifest lists is deleted and rebuilt, so a run
    directory inside one (``<artifacts_dir>/<stage>/<key>/...``, ``<models_dir>/<key>/...``)
    would be deleted with it. A run directory beside the stages (``<artifacts_dir>/run``) is safe.

    Raises:
        NotADirectoryError: ``artifacts_dir`` or ``models_dir`` names an existing file.
        ValueError: the run directory is inside an artifact.

    """
    run_dir = run_dir.resolve()
    for key, directory, depth in (("artifacts_dir", artifacts_dir, 2),
                                  ("models_dir", models_dir, 1)):
        directory = directory.resolve()
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{key}={directory} is a file, not a directory; point "
                                     f"{key} at a directory (it is created if missing)")
        if run_dir.is_relative_to(directory) and len(run_dir.relative_to(directory).parts) >= depth:
            raise ValueError(f"output_dir={run_dir} is inside an artifact of {key}={directory}, "
                             "which lobass deletes whenever it rebuilds that artifact; put the "
                             "run directory outside it")


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


def artifact_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a usable artifact, or ``None`` when it is.

    Usable means: a readable manifest, every file it lists present with its recorded size and
    sha256, and no file that it does not list (an artifact is exactly what its builder wrote).
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest" if directory.exists() else "missing"
    try:
        files = json.loads(manifest_path.read_text())["files"]
        listed = {str(rel): (int(info["size"]), str(info["sha256"])) for rel, info in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable manifest ({type(err).__name__}: {err})"
    for rel, (size, digest) in listed.items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {size} (truncated?)"
        if file_sha256(path) != digest:
            return f"{rel} does not match its sha256 in the manifest (edited or corrupted)"
    extra = [str(p.relative_to(directory)) for p in directory.rglob("*")
             if p.is_file() and p.name != MANIFEST and str(p.relative_to(directory)) not in listed]
    if extra:
        return f"files not in the manifest: {sorted(extra)[:5]}"
    return None


def is_complete(directory: Path) -> bool:
    """True when ``directory`` has a valid manifest matching its files (see artifact_problem).

    A truncated or edited artifact fails this check and is rebuilt rather than used.
    """
    return artifact_problem(directory) is None


def _remove_stale_temporaries(work: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` files that a killed :func:`atomic_write_text` left behind."""
    for stale in work.rglob(".*.tmp-*"):
        if stale.is_file():
            log.warning("removing %s, left by an interrupted write", stale)
            stale.unlink()


def read_meta(directory: Path) -> dict[str, Any]:
    """The ``meta`` block that the builder stored in the manifest."""
    meta: dict[str, Any] = json.loads((directory / MANIFEST).read_text())["meta"]
    return meta


def ensure_artifact(
    directory: Path,
    build: Callable[[Path], dict[str, Any]],
    *,
    collective: bool = False,
) -> tuple[Path, bool]:
    """Return ``(directory, reused)``, building the artifact first when it is missing or invalid.

    The one lock-and-publish routine of the project, for one process and for ``torchrun``:

    * one process: take the artifact's lock, check again, build in ``<key>.partial/``, write the
      manifest and rename into place;
    * several ranks: rank 0 alone checks, holds the lock and publishes (so no rank can wait on a
      lock that another rank needs to release). With ``collective=True`` every rank runs
      ``build`` in the same work directory (data-parallel training, sharded scoring; the builder
      writes shared files from rank 0 only); otherwise rank 0 builds alone while the others wait,
      and artifacts ensured inside that build are handled by rank 0 as if it were alone.

    Args:
        directory: final location ``<artifacts_dir>/<stage>/<key>``.
        build: called with the ``.partial`` work directory; writes its files there and returns
            the metadata to store in the manifest. The work directory survives a crash, so a
            builder may resume from what it finds there.
        collective: every rank takes part in ``build`` (under ``torchrun``).

    Returns:
        The artifact directory and whether an existing complete artifact was reused.

    """
    # Rank 0 building an artifact alone for every rank (on_main, solo) handles those ensured
    # inside that build alone too: the other ranks wait elsewhere and meet at no barrier here.
    if distributed.is_solo() or not distributed.init_from_env():
        return _ensure_alone(directory, build)
    if not collective:
        return distributed.on_main(lambda: _ensure_alone(directory, build))
    main = distributed.is_main()
    if distributed.broadcast(is_complete(directory) if main else None):
        return directory, True
    lock = _artifact_lock(directory) if main else contextlib.nullcontext()
    with lock:
        # Another run may have finished it while rank 0 waited for the lock.
        if distributed.broadcast(is_complete(directory) if main else None):
            return directory, True
        work = work_dir(directory)
        if main:
            _clear_unusable(directory)
            work.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        meta = build(work)
        distributed.barrier()
        if main:
            _publish(work, directory, meta)
        distributed.barrier()
    return directory, False


def _ensure_alone(directory: Path, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, bool]:
    """:func:`ensure_artifact` for one process: lock, check again, build, publish."""
    if is_complete(directory):
        return directory, True
    with _artifact_lock(directory):
        if is_complete(directory):  # another process finished it while we waited
            return directory, True
        _clear_unusable(directory)
        work = work_dir(directory)
        work.mkdir(parents=True, exist_ok=True)
        _publish(work, directory, build(work))
    return directory, False


def _artifact_lock(directory: Path) -> contextlib.AbstractContextManager[None]:
    return file_lock(directory.with_name(directory.name + ".lock"))


def _clear_unusable(directory: Path) -> None:
    if directory.exists():
        log.warning("artifact %s is not usable (%s); rebuilding it", directory,
                    artifact_problem(directory))
        shutil.rmtree(directory)


def work_dir(directory: Path) -> Path:
    """The ``.partial`` directory where ``directory`` is built (kept across crashes)."""
    return directory.with_name(directory.name + ".partial")


def _publish(work: Path, directory: Path, meta: dict[str, Any]) -> None:
    """Finish a build done in ``work``: manifest, then one atomic rename to ``directory``."""
    _remove_stale_temporaries(work)
    write_manifest(work, meta)
    os.replace(work, directory)


def write_row_losses(path: Path, ids: Sequence[str], losses: np.ndarray) -> None:
    """One ``{"id", "loss"}`` line per row (``null`` where the loss is not finite).

    The format of a loss artifact, and of the per-row losses an evaluation keeps so that two
    runs can be compared row by row on the same answers (a paired difference has a far tighter
    interval than two independent means).
    """
    atomic_write_text(path, jsonl_text(
        {"id": i, "loss": float(v) if math.isfinite(v) else None}
        for i, v in zip(ids, losses.tolist(), strict=True)))


def read_row_losses(path: Path) -> dict[str, float]:
    """The finite losses of a file written by :func:`write_row_losses`, by row id."""
    rows = read_jsonl(path)
    return {r["id"]: float(r["loss"]) for r in rows if r["loss"] is not None}
