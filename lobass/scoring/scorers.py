"""Scorers: per-example losses and lengths -> one score per row (higher = more worth selecting).

Each scorer declares the losses it needs (``init``: the initial model, ``ref``: the reference LoRA
adapter enabled, ``uncond``: the initial model on the response alone, ``ifd_cond``/``ifd_alone``:
Cherry LLM's two passes, see :mod:`lobass.scoring.cherry`), so a run computes each loss once
whatever scorers it asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lobass.registry import Registry

log = logging.getLogger(__name__)


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
    # Cherry LLM's instruction-following difficulty, as data_by_IFD.py ranks it: the highest IFD
    # at or below 1. Above 1 the instruction makes the answer *harder* to predict than no
    # instruction at all, which Cherry reads as a misaligned pair and never selects; rows its
    # length checks skip (``ifd_fits``, lobass.scoring.cherry) are never selected either.
    with np.errstate(divide="ignore", invalid="ignore"):
        ifd = losses["ifd_cond"] / losses["ifd_alone"]
    above = ifd > 1
    unfit = ~losses["ifd_fits"].astype(bool) if "ifd_fits" in losses else np.zeros_like(above)
    if above.any() or unfit.any():
        log.info("scorer=ifd: %d of %d rows have IFD > 1 and %d fail Cherry's length checks "
                 "(data.max_length); as in Cherry's data_by_IFD.py they get no score and are "
                 "never selected (loss_ifd_cond / loss_ifd_alone keep their IFD)",
                 int(above.sum()), len(ifd), int((unfit & ~above).sum()))
    return np.where(above | unfit, np.nan, ifd)


def _ifd_chat(losses: dict[str, np.ndarray], n_tokens: np.ndarray, seed: int) -> np.ndarray:
    # IFD's ratio on lobass's own tokens: L(y|x) is L_init in the model's template (response
    # through its end-of-turn token), L(y) the same tokens after one start token. Every row keeps
    # its ratio; near 1 (or above) the prompt barely lowers the response loss.
    with np.errstate(divide="ignore", invalid="ignore"):
        return losses["init"] / losses["uncond"]


def _random(losses: dict[str, np.ndarray], n_tokens: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(len(n_tokens))


SCORERS: Registry[Scorer] = Registry("scorer")
for _scorer in (
    Scorer("lobass", ("init", "ref"), _lobass, "(L_init - L_ref) / L_init"),
    Scorer("rho", ("init", "ref"), lambda ls, n, s: ls["init"] - ls["ref"], "L_init - L_ref"),
    Scorer("loss", ("init",), lambda ls, n, s: ls["init"].copy(), "L_init (hardest first)"),
    Scorer("ifd", ("ifd_cond", "ifd_alone"), _ifd,
           "Cherry LLM's IFD L(y|x) / L(y) on its Alpaca prompt; rows above 1 unscored"),
    Scorer("ifd_chat", ("init", "uncond"), _ifd_chat,
           "L_init / L(response after one start token), lobass's template"),
    Scorer("length", (), lambda ls, n, s: n.astype(np.float64), "response tokens"),
    Scorer("random", (), _random, "uniform, seeded by `seed`"),
):
    SCORERS.add(_scorer.name, _scorer)


def get_scorer(name: str) -> Scorer:
    """Look up a scorer by name, listing the valid names when it is unknown (ValueError)."""
    return SCORERS.lookup(name)


def needed_losses(scorers: Sequence[Scorer]) -> list[str]:
    """The union of the losses ``scorers`` need, each once, in first-needed order."""
    return list(dict.fromkeys(loss for s in scorers for loss in s.needs))
