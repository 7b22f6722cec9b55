"""Process-group helpers for ``torchrun``: rank, world size, barriers, rank-0 decisions.

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment) every helper is a no-op on one process,
so stage code calls them unconditionally. Under ``torchrun`` the rule is: rank 0 decides (is an
artifact complete? which shards exist?) and broadcasts; ranks meet at barriers around shared
writes; only rank 0 writes summaries and talks to W&B.

While rank 0 works alone on every rank's behalf (:func:`on_main`), the others wait at a barrier
elsewhere: inside, the group is rank 0 by itself (:func:`group_size` is 1, barriers and
broadcasts are no-ops), so code that shards its work runs it all on rank 0 instead of hanging.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")

# Ranks wait at barriers while another rank finishes its shards or rank 0 waits for an artifact
# lock held by another run: long waits are legitimate, so the default 30 min would be too short.
TIMEOUT = timedelta(hours=6)

# What TrainingArguments and accelerate write into the environment for a sharded Trainer and never
# take back: ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED, FSDP_CPU_RAM_EFFICIENT_LOADING and
# accelerate's FSDP_*/DEEPSPEED_* plugin settings. transformers' from_pretrained reads the first
# and third: left set, every later load under torchrun reads real weights on local rank 0 only.
STAGE_ENV_PREFIXES = ("ACCELERATE_", "FSDP_", "DEEPSPEED_")


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


def leave_group() -> None:
    """Leave ``torchrun``'s process group at the end of a run that every rank finished.

    torch asks for ``destroy_process_group`` near the end of the program: without it, NCCL's
    pending work may be cut off at exit and every GPU run ends with its "destroy_process_group()
    was not called" warning. The ranks meet first, so none tears the group down while another
    still works in it. Called only after success: after a failure the other ranks may never
    arrive (torch's shutdown notes), and the process's exit ends the group instead.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        log.info("torchrun: rank %s left the process group", os.environ.get("RANK", "?"))


# Set while rank 0 runs :func:`on_main`'s function: the other ranks are not there to meet.
_solo: contextvars.ContextVar[bool] = contextvars.ContextVar("lobass_solo", default=False)


def in_group() -> bool:
    """True when the ranks of a process group run this code together (not alone, not solo)."""
    return dist.is_available() and dist.is_initialized() and not _solo.get()


def is_solo() -> bool:
    """True while rank 0 works alone for every rank (inside :func:`on_main`)."""
    return _solo.get()


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Rank 0 by itself: the group helpers act as on one process (the others wait elsewhere)."""
    token = _solo.set(True)
    try:
        yield
    finally:
        _solo.reset(token)


def group_size() -> int:
    """Ranks that share the work here: the world under ``torchrun``, 1 alone or solo."""
    return dist.get_world_size() if in_group() else 1


def group_rank() -> int:
    """The rank's place among :func:`group_size` ranks (0 alone or solo)."""
    return dist.get_rank() if in_group() else 0


def barrier() -> None:
    """Wait for every rank (no-op on one process, and solo)."""
    if in_group():
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (pickled; for small decisions, not tensors)."""
    if not in_group():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only, then give its result to every rank once it is done.

    For shared writes (an artifact built once) that other ranks must not race or lock on. ``fn``
    runs :func:`solo`: what it shares or gathers stays on rank 0.
    """
    result: Any = None
    if is_main():
        with solo():
            result = fn()
    barrier()
    return broadcast(result)


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s share of ``items``: every ``world``-th item from the ``rank``-th.

    Strided, so neighbours (rows sorted by length, batches longest first) spread evenly over
    the ranks; :func:`unshard` puts the shares back in order.
    """
    return list(items[rank::world])


def unshard(shares: Sequence[Sequence[T]]) -> list[T]:
    """The items of :func:`shard`'s shares, one per rank in rank order, in their first order.

    Raises:
        ValueError: shares whose sizes no strided split gives (a rank lost or doubled items).

    """
    world, total = len(shares), sum(len(s) for s in shares)
    if [len(s) for s in shares] != [len(range(r, total, world)) for r in range(world)]:
        raise ValueError(f"shares of sizes {[len(s) for s in shares]} are not a strided split "
                         f"of {total} items over {world} ranks")
    out: list[Any] = [None] * total
    for rank, share in enumerate(shares):
        out[rank::world] = share
    return out


def map_shards(fn: Callable[[list[T]], Sequence[Any]], items: Sequence[T]) -> list[Any]:
    """``fn(items)`` computed by every rank on its own share, gathered on every rank in order.

    ``fn`` maps a list to a sequence of one result per item. The results travel pickled
    (``all_gather_object``): for per-row numbers and short texts, not tensors.
    """
    world = group_size()
    if world == 1:
        return list(fn(list(items)))
    mine = list(fn(shard(items, group_rank(), world)))
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, mine)
    return unshard(shares)


@contextlib.contextmanager
def restored_environ(*, prefixes: tuple[str, ...] = STAGE_ENV_PREFIXES) -> Iterator[None]:
    """Put the environment variables named ``prefixes*`` back as they were on entry.

    Variables set inside are removed, changed ones restored. One mechanism for both places that
    scope accelerate's FSDP / DeepSpeed settings: a stage (:func:`stage_scope`) and one FSDP
    load (``modeling.load_model`` announces RAM-efficient loading for that load only).
    """
    saved = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith(prefixes) and k not in saved]:
            del os.environ[key]
        os.environ.update(saved)


@contextlib.contextmanager
def stage_scope(stage: str) -> Iterator[None]:
    """Scope a training stage's FSDP / DeepSpeed settings to that stage, restoring them after it.

    A sharded ``Trainer`` leaves three kinds of state in the process, each of which changes how a
    later stage (scoring, eval, another fine-tune) loads or trains:

    * environment variables (:data:`STAGE_ENV_PREFIXES`), restored to their values on entry;
    * transformers' global ``HfDeepSpeedConfig`` reference, which accelerate's ``DeepSpeedPlugin``
      keeps alive: ``is_deepspeed_zero3_enabled()`` stays True, so the next ``from_pretrained``
      runs under ``deepspeed.zero.Init`` ("DeepSpeed Zero-3 is not compatible with passing a
      device_map" on a GPU; weights partitioned over ranks that then score different rows on
      a CPU); ``unset_hf_deepspeed_config`` is transformers' own way to drop it;
    * accelerate's ``PartialState``/``AcceleratorState``/``GradientState`` singletons, which keep
      the stage's FSDP or DeepSpeed plugin and distributed type for the next ``Trainer``. They are
      cleared with accelerate's ``_reset_state`` (what its and transformers' tests use between
      Trainers; there is no public reset) and rebuilt by the next ``TrainingArguments``.

    The torch process group stays up: later stages shard their rows over the same ranks.
    Nothing is imported that the stage did not import itself.

    Args:
        stage: the stage's name, for the log line.

    """
    try:
        with restored_environ():
            yield
    finally:
        if "transformers.integrations.deepspeed" in sys.modules:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        if "accelerate.state" in sys.modules:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        log.debug("stage %s: FSDP/DeepSpeed settings restored", stage)
