"""Process-group helpers for ``torchrun``: rank, world size, barriers, rank-0 decisions.

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment) every helper is a no-op on one process,
so stage code calls them unconditionally. Under ``torchrun`` the rule is: rank 0 decides (is an
artifact complete? which shards exist?) and broadcasts; ranks meet at barriers around shared
writes; only rank 0 writes summaries and talks to W&B.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")

# Ranks wait at barriers while another rank finishes its shards or rank 0 waits for an artifact
# lock held by another run: long waits are legitimate, so the default 30 min would be too short.
TIMEOUT = timedelta(hours=6)


def world_size() -> int:
    """Number of processes (1 outside ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Rank of this process (0 outside ``torchrun``); known from the environment before init."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the one process that writes shared outputs."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment, once.

    Uses NCCL with one GPU per local rank when CUDA is visible, gloo on CPU.

    Returns:
        Whether this process is part of a group of more than one.

    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:  # models then load onto this rank's own device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        log.info("torchrun: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(),
                 dist.get_backend())
    return True


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (pickled; for small decisions, not tensors)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only, then give its result to every rank once it is done.

    For shared writes (an artifact built once) that other ranks must not race or lock on.
    """
    result: Any = fn() if is_main() else None
    barrier()
    return broadcast(result)
