"""What the ``Trainer`` iterates: tokenised rows, and a length-grouped order a resume replays.

Kept apart from the training loop because the order is a correctness property of its own: a run
resumed in any epoch must see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lobass.formatting import Features


class FeatureDataset(torch.utils.data.Dataset[dict[str, list[int]]]):
    """Tokenised examples as the dicts that ``DataCollatorForSeq2Seq`` pads."""

    def __init__(self, features: Sequence[Features]) -> None:
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        f = self.features[index]
        return {"input_ids": f.input_ids, "labels": f.labels,
                "attention_mask": [1] * len(f.input_ids)}


class EpochSeededLengthSampler(torch.utils.data.Sampler[int]):
    """Transformers' length-grouped order; after the first epoch, seeded by ``seed + epoch``.

    transformers' ``LengthGroupedSampler`` draws each epoch's permutation from the global torch
    RNG when the epoch starts. A resume inside epoch ``e > 0`` starts from a freshly seeded RNG
    (the checkpoint's RNG state is restored only after the seen batches are skipped), so it
    replays epoch ``e`` in another order than the uninterrupted run did: different batches from
    the resumed step on. From the second epoch on, the order here depends only on
    ``(seed, epoch)``, which the ``Trainer`` sets through :meth:`set_epoch` before every epoch,
    resumed or not, and the sampler leaves the global RNG (dropout) alone, so the checkpoint's
    RNG state is all a resume needs. The first epoch still draws from the global RNG as before:
    there a resume starts from the same freshly seeded state as the uninterrupted run (exact),
    and every result of a one-epoch run stays bit-identical to what transformers' sampler gave.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields (called by the ``Trainer``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch) if self.epoch else None
        return iter(get_length_grouped_indices(self.lengths, self.batch_size,
                                               generator=generator))
