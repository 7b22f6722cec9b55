"""Scoring: per-example response losses and the scorers that turn them into scores.

Losses are batched, cached in shards and split across ranks: ``engine`` is the hot loop (one
forward per batch of similar-length rows), ``store`` makes each loss a resumable, sharded
artifact, ``runner`` ties them to the score stage, ``scorers`` maps losses to scores, ``cherry``
builds the inputs of Cherry LLM's IFD (``scorer=ifd``) as its own code does.
"""

from lobass.scoring.engine import (
    LOSSES,
    adapter_state,
    batch_response_losses,
    compute_response_losses,
    length_batches,
    shared_prefix_length,
)
from lobass.scoring.scorers import (
    SCORERS,
    Scorer,
    get_scorer,
    needed_losses,
)

__all__ = [
    "LOSSES",
    "SCORERS",
    "Scorer",
    "adapter_state",
    "batch_response_losses",
    "compute_response_losses",
    "get_scorer",
    "length_batches",
    "needed_losses",
    "shared_prefix_length",
]
