"""Reference-free conversation signal: mean response loss on held-out reference answers.

The evaluated model's mean token loss on answers it never trained on (a held-out slice of the
pool, MT-Bench's reference answers) needs no judge, so CPU-sized runs still get a signal that
separates selections; lower is better. The trimmed loss leaves out each answer's first and last
response tokens: those two are learned first and weigh most in a short answer, so a model trained
on short answers gains on them alone (issue 28); the trimmed loss asks whether it gained on the
body of the answer too. Every row's losses go to one small CSV, so a study can commit them and
re-derive each comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lobass.formatting import IGNORE_INDEX, Features
from lobass.stats import mean_interval

PER_PROMPT_LOSSES = "per_prompt_losses.csv"  # in the eval artifact and copied into the run dir
PER_PROMPT_COLUMNS = ["set", "id", "response_tokens", "loss", "loss_trimmed"]


def heldout_loss_metrics(losses: np.ndarray, name: str, metric: str = "loss") -> dict[str, float]:
    """``eval/<name>/<metric>`` with a normal-approximation 95% interval over rows, and a count.

    The count is ``eval/<name>/n`` for ``loss`` and ``eval/<name>/<metric>_n`` otherwise. Rows
    with a non-finite loss (no response token left after truncation or trimming) are left out
    and so not counted.
    """
    finite = losses[np.isfinite(losses)]
    count = f"eval/{name}/n" if metric == "loss" else f"eval/{name}/{metric}_n"
    if not len(finite):
        return {count: 0.0}
    mean, low, high = mean_interval(finite)
    return {
        f"eval/{name}/{metric}": mean,
        f"eval/{name}/{metric}_ci_low": low,
        f"eval/{name}/{metric}_ci_high": high,
        count: float(len(finite)),
    }


def without_first_and_last(features: Features) -> Features:
    """The row with its first and last response tokens left out of the loss (labels ``-100``).

    The mean then runs over response tokens 2..n-1. A row of fewer than three response tokens
    keeps none (its trimmed loss is NaN, and left out of the mean).
    """
    labelled = [t for t, label in enumerate(features.labels) if label != IGNORE_INDEX]
    drop = set(labelled) if len(labelled) < 3 else {labelled[0], labelled[-1]}
    labels = [IGNORE_INDEX if t in drop else label for t, label in enumerate(features.labels)]
    return Features(features.input_ids, labels, features.n_prompt, features.truncated)


def per_prompt_losses(name: str, ids: Sequence[str], features: Sequence[Features],
                      losses: np.ndarray, trimmed: np.ndarray) -> pd.DataFrame:
    """One set's rows of the per-prompt CSV (:data:`PER_PROMPT_COLUMNS`; NaN: no such loss)."""
    return pd.DataFrame({"set": name, "id": list(ids),
                         "response_tokens": [f.n_response for f in features],
                         "loss": losses, "loss_trimmed": trimmed}, columns=PER_PROMPT_COLUMNS)
