"""Batched greedy generation with the chat template, saved incrementally as JSONL.

Prompts are left-padded (generation continues at the right edge of every row) and batched by
length, which on this CPU is several times faster than one prompt at a time. Each finished batch is
appended and fsynced to the output file, so a killed run resumes from the answers already on disk.

Under ``torchrun`` the ranks share the batches: every rank forms the same batches, takes every
world-th one, and appends to its own work file (``<set>.rank<r>.jsonl``) beside the output; rank
0 merges them. A batch holds the same prompts as on one process, and left padding is then the
same too, so the greedy tokens are those of a one-process run (a batch's padding, not its rank,
can move float results).
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig

from lobass import distributed
from lobass.artifacts import atomic_write_text
from lobass.evaluation.prompts import Prompt
from lobass.formatting import tokenize_prompt
from lobass.jsonrows import InvalidJSON, iter_jsonl, jsonl_line, jsonl_text

log = logging.getLogger(__name__)

T = TypeVar("T")


def read_generations(path: Path, *, repair_torn_tail: bool = False) -> dict[str, dict[str, Any]]:
    """Rows of a generations JSONL by prompt id.

    Args:
        path: the file; missing means no rows yet.
        repair_torn_tail: the file is this run's own work file: a torn last line (a kill
            mid-append) is dropped from it, so that appending can go on. Any other file (a
            baseline, another run's answers) is read-only: a torn line there is an error.

    Raises:
        ValueError: a malformed line, or an id that repeats another's as text (``1`` and
            ``"1"``), naming file and line.

    """
    if not path.is_file():
        return {}
    lines = list(iter_jsonl(path))
    rows: dict[str, dict[str, Any]] = {}
    first_line: dict[str, int] = {}  # id as text -> the line that holds it
    for index, (number, row) in enumerate(lines):
        if isinstance(row, InvalidJSON):
            last = index == len(lines) - 1
            if last and repair_torn_tail:  # an interrupted append to our own work file
                log.warning("%s:%d is a torn line from an interrupted run; dropping it", path,
                            number)
                atomic_write_text(path, jsonl_text(rows.values()))
                break
            torn = (" (the last line, cut: the run writing it was killed; lobass does not edit "
                    "this file: regenerate it, or delete that line yourself)") if last else ""
            raise ValueError(f"{path}:{number}: {row}{torn}")
        if not isinstance(row, dict) or "id" not in row or "output" not in row:
            raise ValueError(f"{path}:{number}: a generation row needs 'id' and 'output'")
        key = str(row["id"])  # prompt ids are text; a baseline may write 1 for "1"
        if key in rows:  # 1 and "1", or one id twice: which answer is meant cannot be known
            raise ValueError(f"{path}:{number}: id {row['id']!r} is the id of line "
                             f"{first_line[key]} ({rows[key]['id']!r}) as text; ids must be "
                             "distinct, one answer per prompt")
        rows[key], first_line[key] = row, number
    return rows


# Unicode categories of characters that show nothing: controls (NUL), format characters
# (zero-width space and joiners, BOM, word joiner) and separators (spaces, U+2028/U+2029).
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def visible_answer(text: str) -> str:
    """``text``, or ``""`` when nothing in it is visible (NUL, zero-width or space characters only).

    A model that answers with NULs or zero-width spaces has given no answer: it is stored and
    judged as the empty answer, and counted (``eval/<set>/empty``).
    """
    return text if any(unicodedata.category(c) not in _INVISIBLE for c in text) else ""


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Stop ids: the tokenizer's EOS and the model's generation-config EOS (one or a list)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted(i for i in ids if i is not None)


def generate_batch(model: Any, tokenizer: Any, prompt_ids: Sequence[list[int]], *,
                   max_new_tokens: int) -> list[tuple[list[int], bool]]:
    """Greedy continuations of a batch of tokenised prompts.

    Returns:
        Per prompt, the generated ids up to (not including) the first end-of-turn token, and
        whether such a token was produced (False: cut by ``max_new_tokens``).

    """
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(len(ids) for ids in prompt_ids)
    # Left padding: every row's last prompt token sits at the same column, so new tokens are
    # appended in lockstep; the attention mask hides the pads (and sets position ids).
    input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in prompt_ids],
                             device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids],
                        device=device)  # (B, T)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    results = []
    for row in out[:, width:].tolist():  # (B, new)
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        results.append((row[:cut] if cut is not None else row, cut is not None))
    return results


def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[Prompt], path: Path, *,
                       template: str, max_new_tokens: int, batch_size: int,
                       set_name: str = "",
                       allow_special_tokens: bool = False) -> list[dict[str, Any]]:
    """Answer every prompt greedily, appending rows to ``path`` and resuming from what it holds.

    Args:
        model: causal LM (adapter merged), in eval mode.
        tokenizer: its tokenizer.
        prompts: the prompt set.
        path: JSONL output; rows ``{set, id, prompt, output, n_tokens, finished}``.
        template: ``model.template`` (``chat`` or ``alpaca``), as in training.
        max_new_tokens: generation cap per answer.
        batch_size: prompts per ``generate`` call; batches group prompts of similar length.
        set_name: stored on each row (a baseline file may hold several sets).
        allow_special_tokens: special-token strings in a prompt act as control tokens
            (``data.allow_special_tokens``); ``False``: they are tokenised as plain text.

    Returns:
        The rows in prompt order (the file is rewritten in that order once complete).

    """
    from tqdm.auto import tqdm

    rank, world = distributed.group_rank(), distributed.group_size()
    # answers a killed run left, in the output and any rank's work file: rank 0 merges them
    done = merge_work_files(path) if rank == 0 else {}
    distributed.barrier()
    if rank != 0:
        done = read_generations(path)  # merged above: read-only from here on
    todo = [p for p in prompts if p.id not in done]
    if done and rank == 0:
        log.info("eval.generation: resuming %s with %d of %d answers already in %s", set_name,
                 len(prompts) - len(todo), len(prompts), path)
    ids = {p.id: tokenize_prompt(p.messages, tokenizer, template,
                                 allow_special_tokens=allow_special_tokens) for p in todo}
    todo.sort(key=lambda p: (-len(ids[p.id]), p.id))  # similar lengths together: less padding
    mine, n_batches = rank_batches(todo, batch_size, rank, world)
    own = path if world == 1 else rank_work_file(path, rank)
    if world > 1:
        log.info("eval.generation: rank %d of %d answers %d of %d batches of %s", rank, world,
                 len(mine), n_batches, set_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(own, "a", encoding="utf-8") as handle, tqdm(
        total=sum(map(len, mine)), desc=f"generate {set_name}", unit="prompt",
        disable=rank != 0,
    ) as bar:
        for batch in mine:
            outputs = generate_batch(model, tokenizer, [ids[p.id] for p in batch],
                                     max_new_tokens=max_new_tokens)
            for prompt, (tokens, finished) in zip(batch, outputs, strict=True):
                row = {"set": set_name, "id": prompt.id, "prompt": prompt.messages[-1]["content"],
                       "output": visible_answer(
                           tokenizer.decode(tokens, skip_special_tokens=True).strip()),
                       "n_tokens": len(tokens), "finished": finished}
                done[prompt.id] = row
                handle.write(jsonl_line(row))
            handle.flush()
            os.fsync(handle.fileno())  # a kill after this point loses nothing of the batch
            bar.update(len(batch))
    distributed.barrier()  # every rank's answers are on disk
    if rank == 0:
        done.update(merge_work_files(path))
        # Complete: rewrite in prompt order (batches ran longest first), so the file reads like
        # the set.
        atomic_write_text(path, jsonl_text(done[p.id] for p in prompts))
    distributed.barrier()
    if rank != 0:  # rank 0's own rows are those it just wrote
        done = read_generations(path)
    return [done[p.id] for p in prompts]


def rank_batches(todo: Sequence[T], batch_size: int, rank: int,
                 world: int) -> tuple[list[list[T]], int]:
    """The batches rank ``rank`` of ``world`` answers, and how many batches there are in all.

    The batches are those of one process (``todo`` in order, ``batch_size`` at a time); the rank
    takes every ``world``-th. Sharding prompts instead would batch each rank's prompts anew: other
    neighbours, other left padding, and greedy tokens that may differ where padding moves a
    logit across a near tie (bf16 above all).
    """
    batches = [list(todo[start:start + batch_size]) for start in range(0, len(todo), batch_size)]
    return distributed.shard(batches, rank, world), len(batches)


def rank_work_file(path: Path, rank: int) -> Path:
    """Where rank ``rank`` appends its answers for ``path`` under ``torchrun`` (merged, removed)."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def merge_work_files(path: Path) -> dict[str, dict[str, Any]]:
    """The answers in ``path`` and in every rank's work file, merged into ``path``.

    Run by one process (rank 0) while no rank appends. Each file's torn last line, left by a
    kill mid-append, is dropped. The work files are removed once ``path`` holds their rows, so
    the published set is one file; a resume with another world size starts from it.
    """
    rows = read_generations(path, repair_torn_tail=True)
    parts = sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))
    for part in parts:  # a kill between the write below and the unlinks: rows seen twice, equal
        rows.update(read_generations(part, repair_torn_tail=True))
    if parts:
        atomic_write_text(path, jsonl_text(rows.values()))
        for part in parts:
            part.unlink()
    return rows


def generation_metrics(rows: Sequence[dict[str, Any]], name: str) -> dict[str, float]:
    """Answer length, share cut by ``max_new_tokens`` and empty answers, per set.

    The cut share signals long or looping answers; ``empty`` counts answers with nothing visible
    (an empty string, NULs, zero-width characters). ``gen_len_tokens`` is the mean of the rows'
    ``n_tokens``: generated tokens up to, not including, the end-of-turn token. A model that
    learnt to stop after a few tokens (trained on short answers) shows it here, where a
    teacher-forced loss cannot.
    """
    if not rows:
        return {}
    n = len(rows)
    return {
        f"eval/{name}/generated": float(n),
        f"eval/{name}/gen_len_tokens": sum(r["n_tokens"] for r in rows) / n,
        f"eval/{name}/truncated_share": sum(not r["finished"] for r in rows) / n,
        f"eval/{name}/empty": float(sum(not visible_answer(r["output"]) for r in rows)),
    }


def enabled_prompt_sets(eval_cfg: DictConfig) -> dict[str, DictConfig]:
    """The generation prompt sets switched on, by name.

    Their names were checked against the other metric groups by ``lobass.config.validate``
    (``schema.eval_specs.clashing_set_names``).
    """
    generation = eval_cfg.generation
    if not generation.enabled:
        return {}
    return {str(k): v for k, v in generation.sets.items() if v.enabled}


def judged_sets(eval_cfg: DictConfig) -> dict[str, DictConfig]:
    """The enabled prompt sets whose answers the judge compares (``sets.<name>.judge``).

    A set answered only for its length (``alpaca_eval``) needs no baseline answers and no judge.
    """
    return {k: v for k, v in enabled_prompt_sets(eval_cfg).items() if v.judge}
