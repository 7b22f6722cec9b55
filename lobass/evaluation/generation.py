"""Batched greedy generation with the chat template, saved incrementally as JSONL.

Prompts are left-padded (generation continues at the right edge of every row) and batched by
length, which on this CPU is several times faster than one prompt at a time. Each finished batch is
appended and fsynced to the output file, so a killed run resumes from the answers already on disk.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lobass.artifacts import atomic_write_text
from lobass.evaluation.prompts import Prompt
from lobass.formatting import tokenize_prompt

log = logging.getLogger(__name__)


def read_generations(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of a generations JSONL by prompt id; a torn last line (killed mid-write) is dropped.

    Raises:
        ValueError: a malformed line other than the last, naming file and line.

    """
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # an interrupted append: rewrite the file without it
                log.warning("%s:%d is a torn line from an interrupted run; dropping it", path,
                            number)
                atomic_write_text(path, "".join(x + "\n" for x in lines[:-1]))
                break
            raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from err
        if not isinstance(row, dict) or "id" not in row or "output" not in row:
            raise ValueError(f"{path}:{number}: a generation row needs 'id' and 'output'")
        rows[str(row["id"])] = row
    return rows


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

    done = read_generations(path)
    todo = [p for p in prompts if p.id not in done]
    if done:
        log.info("eval.generation: resuming %s with %d of %d answers already in %s", set_name,
                 len(prompts) - len(todo), len(prompts), path)
    ids = {p.id: tokenize_prompt(p.messages, tokenizer, template,
                                 allow_special_tokens=allow_special_tokens) for p in todo}
    todo.sort(key=lambda p: (-len(ids[p.id]), p.id))  # similar lengths together: less padding
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle, tqdm(
        total=len(prompts), initial=len(prompts) - len(todo), desc=f"generate {set_name}",
        unit="prompt",
    ) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            outputs = generate_batch(model, tokenizer, [ids[p.id] for p in batch],
                                     max_new_tokens=max_new_tokens)
            for prompt, (tokens, finished) in zip(batch, outputs, strict=True):
                row = {"set": set_name, "id": prompt.id, "prompt": prompt.messages[-1]["content"],
                       "output": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                       "n_tokens": len(tokens), "finished": finished}
                done[prompt.id] = row
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # a kill after this point loses nothing of the batch
            bar.update(len(batch))
    rows = [done[p.id] for p in prompts]
    # Complete: rewrite in prompt order (batches ran longest first), so the file reads like the set.
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def generation_metrics(rows: Sequence[dict[str, Any]], name: str) -> dict[str, float]:
    """Answer length and the share cut by ``max_new_tokens`` (a long-answer or looping signal)."""
    if not rows:
        return {}
    n = len(rows)
    return {
        f"eval/{name}/generated": float(n),
        f"eval/{name}/response_tokens": sum(r["n_tokens"] for r in rows) / n,
        f"eval/{name}/truncated_share": sum(not r["finished"] for r in rows) / n,
    }
