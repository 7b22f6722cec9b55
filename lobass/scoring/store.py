"""Each loss as a resumable, sharded artifact that several ``torchrun`` ranks can fill together.

The pool is cut into fixed shards of ``shard_rows`` consecutive rows (pool order). Shards are
computed and written one by one into the artifact's ``.partial`` work directory, which survives a
crash, so a run killed at any point and started again computes only the shards that are missing.
Under ``torchrun`` shard ``s`` belongs to rank ``s % world_size``; rank 0 decides what exists,
holds the artifact lock (no other rank ever waits on it, so nothing can deadlock on it) and, once
every rank has passed the barrier, assembles the shards into one ``losses.jsonl`` in pool order.

A shard's rows are batched on their own, so its losses do not depend on which process or run
computed it: resumed, sharded and uninterrupted runs give the same numbers.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lobass import distributed as dist
from lobass.artifacts import (
    atomic_write_text,
    ensure_artifact,
    read_meta,
    write_row_losses,
)
from lobass.jsonrows import read_jsonl

log = logging.getLogger(__name__)

LOSSES_FILE = "losses.jsonl"
SHARDS = "shards"

# Computes the losses of the given pool rows (indices), calling ``progress(n)`` as rows finish.
ComputeFn = Callable[[list[int], Callable[[int], None]], np.ndarray]


@dataclass
class LossResult:
    """A loss for every pool row and how it was obtained."""

    values: np.ndarray  # (N,) float64, NaN where non-finite
    reused: bool  # the complete artifact was already there: no model forward at all
    meta: dict[str, Any] = field(default_factory=dict)  # shards total / resumed / computed


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each shard of ``shard_rows`` rows (the last may be shorter)."""
    if shard_rows < 1:
        raise ValueError(f"score.shard_rows must be >= 1, got {shard_rows}")
    return [(lo, min(lo + shard_rows, n_rows)) for lo in range(0, n_rows, shard_rows)]


def _shard_path(work: Path, lo: int, hi: int) -> Path:
    # The range is in the name: a run with another shard_rows never mistakes these for its own.
    return work / SHARDS / f"{lo:09d}-{hi:09d}.json"


def _read_shard(path: Path, ids: Sequence[str]) -> np.ndarray | None:
    """A shard's losses, or ``None`` when it is missing or not for these rows."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("ids") != list(ids):
        return None
    return np.array([math.nan if v is None else v for v in data["loss"]], dtype=np.float64)


def _write_shard(path: Path, ids: Sequence[str], values: np.ndarray) -> None:
    losses = [float(v) if np.isfinite(v) else None for v in values]
    atomic_write_text(path, json.dumps({"ids": list(ids), "loss": losses}) + "\n")


def read_losses(directory: Path) -> np.ndarray:
    """The ``(N,)`` losses of a complete loss artifact, in pool order (NaN where non-finite)."""
    rows = read_jsonl(directory / LOSSES_FILE)
    return np.array([math.nan if r["loss"] is None else r["loss"] for r in rows], dtype=np.float64)


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    # rows/s and ETA are tqdm's own; only rank 0 draws, so ranks do not garble one terminal.
    return tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True, mininterval=2.0,
                disable=not dist.is_main())


def ensure_losses(directory: Path, ids: Sequence[str], compute: ComputeFn, *, shard_rows: int,
                  desc: str = "score") -> LossResult:
    """Load the loss artifact at ``directory``, computing whatever shards are missing first.

    Every rank must call this with the same arguments (under ``torchrun``); each computes its own
    shards inside one collective :func:`lobass.artifacts.ensure_artifact`, and every rank returns
    the complete result.

    Args:
        directory: ``<artifacts_dir>/losses/<key>``; the key hashes everything the losses depend on.
        ids: the pool's row ids, in pool order.
        compute: losses of a list of row indices (loads the model on first use, so a complete
            artifact costs no model load and no forward).
        shard_rows: rows per shard: the unit of resumption after a crash and of work per rank.
        desc: progress-bar label.

    Returns:
        The losses in pool order, whether they were reused, and shard counts.

    """
    ranges = shard_ranges(len(ids), shard_rows)

    def build(work: Path) -> dict[str, Any]:
        (work / SHARDS).mkdir(parents=True, exist_ok=True)
        # Rank 0 decides which shards a crashed run already left; every rank gets its answer.
        on_disk: list[int] | None = None
        if dist.is_main():
            on_disk = [i for i, (lo, hi) in enumerate(ranges)
                       if _read_shard(_shard_path(work, lo, hi), ids[lo:hi]) is not None]
        shards: list[int] | None = dist.broadcast(on_disk)
        done = set(shards or [])
        mine = [i for i in dist.shard(range(len(ranges)), dist.rank(), dist.world_size())
                if i not in done]
        if done and dist.is_main():
            log.info("%s: resuming, %d of %d shards already on disk in %s", desc, len(done),
                     len(ranges), work)
        with _progress_bar(sum(hi - lo for i, (lo, hi) in enumerate(ranges) if i not in done),
                           desc) as bar:
            for i in mine:
                lo, hi = ranges[i]
                _write_shard(_shard_path(work, lo, hi), ids[lo:hi],
                             compute(list(range(lo, hi)), bar.update))
                if dist.world_size() > 1:  # other ranks' rows: estimate from our own pace
                    bar.update((hi - lo) * (dist.world_size() - 1))
        dist.barrier()  # every rank's shards are on disk before rank 0 assembles them
        meta = {"rows": len(ids), "shard_rows": shard_rows, "shards": len(ranges),
                "shards_resumed": len(done), "shards_computed": len(ranges) - len(done),
                "world_size": dist.world_size()}
        if dist.is_main():
            meta["nonfinite"] = int((~np.isfinite(_assemble(work, ranges, ids))).sum())
        return meta

    directory, reused = ensure_artifact(directory, build, collective=True)
    return LossResult(read_losses(directory), reused, read_meta(directory))


def _assemble(work: Path, ranges: list[tuple[int, int]], ids: Sequence[str]) -> np.ndarray:
    """Concatenate the shards in pool order into ``losses.jsonl``; drop the shard files."""
    parts = []
    for lo, hi in ranges:
        part = _read_shard(_shard_path(work, lo, hi), ids[lo:hi])
        if part is None:
            raise RuntimeError(f"shard {lo}-{hi} is missing from {work / SHARDS} after every "
                               "rank finished; was the work directory removed during the run?")
        parts.append(part)
    values = np.concatenate(parts) if parts else np.zeros(0)
    write_row_losses(work / LOSSES_FILE, ids, values)
    shutil.rmtree(work / SHARDS)  # the artifact is the one ordered file; shards were the means
    return values
