"""Resumable training state: the newest checkpoint that can really be loaded.

A run killed at any moment leaves checkpoints behind; resuming must pick one that was saved
completely and whose files read back, never die on a half-written one, and never lose work by
deleting a checkpoint it could have used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest ``checkpoint-<step>`` that was saved completely and loads, or ``None``.

    ``Trainer`` writes a checkpoint's files in place and ``trainer_state.json`` last, so a run
    killed while saving leaves a directory without a readable one; resuming from it would fail
    (or load a half-written optimizer state), so it is deleted. ``save_total_limit`` deletes the
    previous checkpoint only after the new one is complete, so an older complete one is still
    there. A checkpoint that looks complete but whose files cannot be read (a truncated adapter,
    a damaged optimizer state: a disk that filled up, a copy cut short) would make every rerun
    die on it, so it is set aside beside the work directory, logged with both paths, and the
    previous checkpoint (or the start) is used.
    """
    complete: list[tuple[int, Path]] = []
    for directory in checkpoints.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", directory.name)
        if not match or not directory.is_dir():
            continue
        try:
            json.loads((directory / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("removing %s: incomplete (the run was stopped while saving it)", directory)
            shutil.rmtree(directory, ignore_errors=True)  # other ranks may be removing it too
            continue
        complete.append((int(match[1]), directory))
    for _, directory in sorted(complete, reverse=True):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory
        work = checkpoints.parent
        aside = work.with_name(f"{work.name}.unusable-{directory.name}-{int(time.time())}")
        with contextlib.suppress(OSError):  # another rank may have moved it already
            os.replace(directory, aside)
        log.warning("setting aside %s: it cannot be loaded (%s); moved to %s; resuming from the "
                    "previous checkpoint, or from the start if there is none",
                    directory, problem, aside)
    return None


def checkpoint_problem(directory: Path) -> str | None:
    """Why the files of a ``Trainer`` checkpoint cannot be loaded, or ``None`` when they can.

    Checks what a resume reads, without unpickling anything: every safetensors file's header
    (its tensors must cover the file exactly, so a cut file fails), and every ``torch.save``
    file (``.pt``/``.pth``, zip archives) against its CRCs. Pickled arguments
    (``training_args.bin``) are not loaded on resume and not checked.
    """
    from safetensors import safe_open

    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        try:
            if path.suffix == ".safetensors":  # the header must cover the file exactly
                with safe_open(str(path), framework="pt"):
                    pass
            elif path.suffix in (".pt", ".pth"):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{name}: member {bad} fails its CRC check"
        except Exception as err:  # any failure to read it means: do not resume from it
            return f"{name}: {type(err).__name__}: {err}"
    return None
