"""SIGTERM as an exception, so a run stopped by a scheduler records its failure like Ctrl-C does.

SLURM sends SIGTERM at a job's time limit (and submitit runs each sweep point as a job), as do
``kill`` and torchrun when another rank fails. Python's default action for SIGTERM ends the
process on the spot: no ``error.txt``, no partial ``summary.json``, and the report could not tell
the point from one never started. Raised as :class:`Terminated` instead, it unwinds through the
pipeline's ``except BaseException`` like a ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger(__name__)


class Terminated(SystemExit):
    """SIGTERM arrived.

    A ``SystemExit``, so no ``except Exception`` swallows it; its code, 128 + 15, is what a shell
    reports for a process ended by SIGTERM.
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return (f"{signal.Signals(self.signum).name} received: the run was stopped from outside "
                "(a scheduler's time limit, kill, or torchrun ending the other ranks)")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated`; the previous handler is restored after.

    Only the first SIGTERM raises: later ones (SLURM and torchrun may repeat it) are logged and
    ignored while the run writes ``error.txt`` and its partial summary, so the record is not cut
    short; SIGKILL still ends the process. Outside the main thread Python cannot set a handler,
    and the block runs with the handler as it is.

    Also usable as a decorator (``@sigterm_raises()``), as every ``contextlib`` context manager.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def again(signum: int, frame: FrameType | None) -> None:
        log.warning("SIGTERM again while stopping: ignored until error.txt is written")

    def first(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, again)
        log.error("SIGTERM received: stopping the run and recording it in error.txt")
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, first)
    try:
        yield
    finally:
        # None: a handler set outside Python cannot be put back; the default is the closest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
