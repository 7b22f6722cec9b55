"""Reference-free conversation signal: mean response loss on held-out reference answers.

The evaluated model's mean token loss on answers it never trained on (a held-out slice of the
pool, MT-Bench's reference answers) needs no judge, so CPU-sized runs still get a signal that
separates selections; lower is better.
"""

from __future__ import annotations

import numpy as np

from lobass.stats import mean_interval


def heldout_loss_metrics(losses: np.ndarray, name: str) -> dict[str, float]:
    """``eval/<name>/loss`` with a normal-approximation 95% interval over rows, and ``n``.

    Rows with a non-finite loss (no response token left after truncation) are left out and so
    not counted in ``n``.
    """
    finite = losses[np.isfinite(losses)]
    if not len(finite):
        return {f"eval/{name}/n": 0.0}
    mean, low, high = mean_interval(finite)
    return {
        f"eval/{name}/loss": mean,
        f"eval/{name}/loss_ci_low": low,
        f"eval/{name}/loss_ci_high": high,
        f"eval/{name}/n": float(len(finite)),
    }
