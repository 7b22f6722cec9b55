"""Scorers: per-example losses and lengths -> one score per row (higher = more worth selecting).

Each scorer declares the losses it needs (``init``: the initial model, ``ref``: the reference LoRA
adapter enabled, ``uncond``: the initial model on the response alone), so a run computes each loss
once whatever scorers it asks for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scorer:
    """A named score over per-example losses and response lengths."""

    name: str
    needs: tuple[str, ...]
    compute: Callable[[dict[str, np.ndarray], np.ndarray, int], np.ndarray]
    description: str


def _lobass(losses: dict[str, np.ndarray], n_tokens: np.ndarray, seed: int) -> np.ndarray:
    # Relative loss reduction: dividing by L_init removes the scale (and length) effect of the
    # plain difference, so easy-and-learned rows and hard-and-unlearned rows both score low.
    with np.errstate(divide="ignore", invalid="ignore"):
        return (losses["init"] - losses["ref"]) / losses["init"]


def _ifd(losses: dict[str, np.ndarray], n_tokens: np.ndarray, seed: int) -> np.ndarray:
    # Instruction-following difficulty (Cherry LLM): how much the instruction fails to help.
    # Near 1 (or above) the prompt barely lowers the response loss; Cherry keeps the highest.
    with np.errstate(divide="ignore", invalid="ignore"):
        return losses["init"] / losses["uncond"]


def _random(losses: dict[str, np.ndarray], n_tokens: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(len(n_tokens))


SCORERS: dict[str, Scorer] = {
    s.name: s
    for s in (
        Scorer("lobass", ("init", "ref"), _lobass, "(L_init - L_ref) / L_init"),
        Scorer("rho", ("init", "ref"), lambda ls, n, s: ls["init"] - ls["ref"], "L_init - L_ref"),
        Scorer("loss", ("init",), lambda ls, n, s: ls["init"].copy(), "L_init (hardest first)"),
        Scorer("ifd", ("init", "uncond"), _ifd, "L(y|x) / L(y) (Cherry LLM)"),
        Scorer("length", (), lambda ls, n, s: n.astype(np.float64), "response tokens"),
        Scorer("random", (), _random, "uniform, seeded by `seed`"),
    )
}


def get_scorer(name: str) -> Scorer:
    """Look up a scorer by name, listing the valid names when it is unknown."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {sorted(SCORERS)}")
    return SCORERS[name]


def needed_losses(scorers: Sequence[Scorer]) -> list[str]:
    """The union of the losses ``scorers`` need, each once, in first-needed order."""
    return list(dict.fromkeys(loss for s in scorers for loss in s.needs))


def is_finite(values: np.ndarray) -> np.ndarray:
    """Boolean mask of finite values (NaN and inf losses must never be selected silently)."""
    return np.isfinite(values)


def mean_finite(values: np.ndarray) -> float:
    """Mean over finite values (NaN when there are none)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan
