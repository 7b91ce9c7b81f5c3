"""Batches that never mix text-only and image rows, with every rank on the same modality at every step.

Some architectures refuse a batch that mixes the two (``MllamaProcessor`` raises; Mllama skips its
cross-attention only for an all-text batch), so a dataset with both is batched by modality. In a distributed run
that is not enough: all ranks must take the same modality at the same step. Under DeepSpeed ZeRO-3 a rank with an
image batch gathers the vision tower's parameters and a rank with a text batch does not, so the collectives no
longer pair up and the run hangs; under DDP the vision tower's gradient is averaged with zeros from the text
ranks (or, with ``find_unused_parameters`` off, the run stops).

How the Trainer reads this order: the DataLoader cuts it into batches of ``batch_size`` rows, and with several
processes accelerate's ``BatchSamplerShard`` hands batch ``k`` to rank ``k % world_size`` (transformers leaves
``split_batches`` and ``dispatch_batches`` off). So one micro-step of the whole run is ``world_size ×
batch_size`` consecutive indices: a *global batch*. Every global batch here is one modality, so every rank's
micro-batch is one modality and all ranks agree at every micro-step; with gradient accumulation each rank takes
the same next ``gradient_accumulation_steps`` micro-steps, so they agree at every optimizer step as well. The
order's length is a whole number of global batches, so accelerate never tops up a short last batch with rows from
the start of the epoch (which could be of the other modality).

The remainder: each modality is shuffled (and, optionally, length-grouped) on its own, and its last global batch
is filled with repeats of randomly chosen rows of the same modality, different rows each epoch. No row is
dropped; at most ``world_size × batch_size − 1`` rows per modality and epoch are trained twice (``repeated``;
the plan counts them too; a modality with fewer rows than one global batch is cycled, so its rows repeat more).
The other choices are worse: dropping the remainder loses records; a short batch is only possible at the very
end of the order, and filling with rows of the other modality makes a mixed batch. Gradient accumulation is
deliberately not part of the unit: aligned micro-steps already keep every collective paired, and making whole
optimizer steps one modality would repeat up to ``gradient_accumulation_steps`` times as many rows.

Deterministic for a seed: each epoch uses ``seed + epoch``. The Trainer calls ``set_epoch`` before every pass;
without it, each pass moves on to the next epoch by itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler


def is_mixed(has_images: list[bool]) -> bool:
    """True when some rows have images and some do not."""
    return any(has_images) and not all(has_images)


def index_sampler(dataloader: DataLoader) -> Sampler:
    """The sampler that orders a DataLoader's indices, under the batch samplers that wrap it: torch's
    ``BatchSampler`` and accelerate's ``BatchSamplerShard`` (one per process) and ``SkipBatchSampler`` (resume). A
    batch sampler of its own (``token_budget.TokenBudgetBatchSampler``) is that sampler: it orders whole batches."""
    node = dataloader.batch_sampler if dataloader.batch_sampler is not None else dataloader.sampler
    while True:
        if hasattr(node, "batch_sampler"):  # accelerate's wrappers
            node = node.batch_sampler
        elif isinstance(node, BatchSampler):
            node = node.sampler
        else:
            return node


class ModalityGroupedSampler(Sampler[int]):
    """Index order whose every consecutive ``world_size × batch_size`` chunk (one global batch) is of one modality.

    ``batch_size`` is the per-device batch (the DataLoader's); ``world_size`` the number of data-parallel ranks
    among which accelerate deals the batches out.
    """

    def __init__(
        self,
        has_images: list[bool],
        batch_size: int,
        seed: int,
        lengths: list[int] | None = None,
        world_size: int = 1,
    ):
        self.groups = [
            [i for i, flag in enumerate(has_images) if flag],
            [i for i, flag in enumerate(has_images) if not flag],
        ]
        self.batch_size = batch_size
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.seed = seed
        self.lengths = lengths
        self.epoch = 0

    def __len__(self) -> int:
        return sum(math.ceil(len(group) / self.global_batch) * self.global_batch for group in self.groups)

    @property
    def repeated(self) -> int:
        """Rows each epoch trains twice, to fill the last global batch of each modality."""
        return len(self) - len(self.groups[0]) - len(self.groups[1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        batches = [batch for group in self.groups if group for batch in self._global_batches(group, generator)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[b]

    def _global_batches(self, group: list[int], generator: torch.Generator) -> list[list[int]]:
        order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        # Fill the last global batch with rows of this modality, taken from the shuffled order (so random rows,
        # and different ones each epoch); a modality smaller than one global batch is cycled.
        short = -len(order) % self.global_batch
        order += (order * math.ceil(short / len(order)))[:short]
        if self.lengths is not None:
            # Like transformers' LengthGroupedSampler: sort within mega-batches of 50 global batches. Mega-batches
            # are whole global batches, so every global batch stays one modality.
            mega = 50 * self.global_batch
            order = [
                i
                for s in range(0, len(order), mega)
                for i in sorted(order[s : s + mega], key=lambda i: -self.lengths[i])
            ]
        return [order[s : s + self.global_batch] for s in range(0, len(order), self.global_batch)]
