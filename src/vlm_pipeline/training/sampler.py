"""Batches that never mix text-only and image rows.

Some architectures refuse a batch that mixes the two (``MllamaProcessor`` raises; Mllama skips its
cross-attention only for an all-text batch), so a dataset with both is batched by modality. Each modality is
shuffled (and, optionally, length-grouped), padded to whole batches by repeating a few of its own rows (no
row is dropped, so no record is lost), and the batches are then shuffled together.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def is_mixed(has_images: list[bool]) -> bool:
    """True when some rows have images and some do not."""
    return any(has_images) and not all(has_images)


class ModalityGroupedSampler(Sampler[int]):
    """Index order whose every consecutive ``batch_size`` chunk is of one modality.

    Deterministic for a seed; each pass over the data (epoch) uses the next seed, as Trainer expects.
    """

    def __init__(self, has_images: list[bool], batch_size: int, seed: int, lengths: list[int] | None = None):
        self.groups = [
            [i for i, flag in enumerate(has_images) if flag],
            [i for i, flag in enumerate(has_images) if not flag],
        ]
        self.batch_size = batch_size
        self.seed = seed
        self.lengths = lengths
        self.epoch = 0

    def __len__(self) -> int:
        return sum(-(-len(group) // self.batch_size) * self.batch_size for group in self.groups if group)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        batches = [batch for group in self.groups if group for batch in self._batches(group, generator)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[b]

    def _batches(self, group: list[int], generator: torch.Generator) -> list[list[int]]:
        order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        if self.lengths is not None:
            # Like transformers' LengthGroupedSampler: sort within mega-batches of 50 batches.
            mega = 50 * self.batch_size
            order = [
                i
                for s in range(0, len(order), mega)
                for i in sorted(order[s : s + mega], key=lambda i: -self.lengths[i])
            ]
        short = -len(order) % self.batch_size
        order += order[:short]  # fill the last batch with rows of the same modality
        return [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
