r"""Exploratory, after the results (not pre-registered): how much of each answer is copied.

Per stage-2 arm: how much of each trained answer is copied from its own prompt.

``python experiments/cpu_gemma_crossfit/copy_share.py ../lobass-studies/cpu_gemma_crossfit/stage2``

A row's copy share is the fraction of its answer's words (``\\w+``, lower-cased) that occur in its
instruction or input. Printed per arm: the mean share over the trained rows, and the fraction of
rows with at least 80% of their answer words in the prompt, each averaged over the arm's runs.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

from lobass.jsonrows import read_jsonl

ARMS = ("random", "lobass_in_sample", "lobass_cross_fit", "length_matched_random",
        "lobass_cross_fit_residual", "longest")


def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return re.findall(r"\w+", text.lower())


def copy_share(row: dict) -> float:
    """Fraction of the answer's words found in the instruction or input (0 for an empty answer)."""
    answer = words(row["output"])
    prompt = set(words(f"{row['instruction']} {row['input']}"))
    return sum(w in prompt for w in answer) / len(answer) if answer else 0.0


def main() -> None:
    """Print each arm's mean copy share and share of mostly copied rows."""
    stage2 = Path(sys.argv[1])
    for arm in ARMS:
        means, mostly = [], []
        for run in sorted((stage2 / arm).glob("s*")):
            export = json.loads((run / "summary.json").read_text())["artifacts"]["export"]
            shares = [copy_share(r) for r in read_jsonl(Path(export))]
            means.append(statistics.mean(shares))
            mostly.append(sum(s >= 0.8 for s in shares) / len(shares))
        sys.stdout.write(f"{arm:26s} runs={len(means)} mean_copy_share="
                         f"{statistics.mean(means):.2f} rows_at_least_80pct_copied="
                         f"{statistics.mean(mostly):.2f}\n")


if __name__ == "__main__":
    main()
