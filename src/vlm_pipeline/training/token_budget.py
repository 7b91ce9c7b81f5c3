"""Micro-batches that hold as many records as fit a token budget (``sft.max_tokens_per_batch``).

A micro-batch of ``per_device_train_batch_size`` rows wastes the device on short records and runs out of memory
on long ones; a token budget keeps the work of every forward pass about the same. A record's tokens are the
preprocessed dataset's ``length`` column, the length of its ``input_ids``: for Qwen2.5-VL that already includes the
expanded image tokens (one per 2×2 merged patch), so an image's size counts against the budget; for Mllama an image
is one ``<|image|>`` token, its tiles entering through cross-attention outside the budget.

What a micro-batch costs depends on how the collator lays it out: packed (``sft.padding_free``) it is one row of
all its records, the sum of their lengths; padded it is rows × its longest record. Either cost stays within the
budget, and a record longer than the budget fits in no micro-batch (preprocessing sets aside or cuts every record
over ``preprocessing.max_length``, and the schema keeps the budget at least that).

The partition: image rows and text-only rows apart (as ``sampler.py`` explains, some families refuse a mixed
batch and distributed ranks must agree on the modality), each modality sorted by length and filled greedily, so a
padded micro-batch holds records of about one length. The partition is computed once and is the same every epoch,
so the number of micro-batches, and with it the Trainer's step count, is known before the run (the planner calls
the same function). Each epoch only shuffles the order, with ``seed + epoch``.

Rank alignment, as in ``sampler.py``: accelerate's ``BatchSamplerShard`` deals micro-batch ``k`` to rank
``k % world_size``, so every ``world_size`` consecutive micro-batches (one global batch) must be one modality. Each
modality's count is made a multiple of ``world_size`` by splitting its micro-batches with the most rows in two
(a part never costs more than the whole), and the order moves whole global batches. No row is dropped or repeated.
The sampler has no ``batch_size`` attribute: ``BatchSamplerShard`` then takes each micro-batch as it comes,
whatever its size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

MODALITIES = (("image", True), ("text-only", False))


def batch_cost(lengths: list[int], packed: bool) -> int:
    """Tokens a micro-batch of rows with these lengths takes: their sum packed, rows × the longest padded."""
    return _cost(len(lengths), sum(lengths), max(lengths, default=0), packed)


def _cost(rows: int, total: int, longest: int, packed: bool) -> int:
    return total if packed else rows * longest


def micro_batches(
    lengths: list[int], has_images: list[bool], max_tokens: int, world_size: int = 1, packed: bool = False
) -> list[list[int]]:
    """Row indices cut into micro-batches of at most ``max_tokens`` tokens each (see the module docstring).

    Image micro-batches first, then text-only ones, each modality's by length; every consecutive ``world_size`` of
    them is one modality. ValueError when a row is longer than the budget, or when a modality cannot give every
    rank a micro-batch of its own."""
    _check_rows_fit(lengths, max_tokens)
    batches: list[list[int]] = []
    for name, flag in MODALITIES:
        rows = sorted((i for i, images in enumerate(has_images) if images == flag), key=lambda i: lengths[i])
        if rows:
            filled = _fill(rows, lengths, max_tokens, packed)
            batches += _deal_evenly(filled, world_size, name, max_tokens)
    return batches


def _check_rows_fit(lengths: list[int], max_tokens: int) -> None:
    over = [i for i, length in enumerate(lengths) if length > max_tokens]
    if over:
        first = over[0]
        others = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
        raise ValueError(
            f"row {first} has {lengths[first]} tokens{others}, over sft.max_tokens_per_batch {max_tokens}: no "
            "micro-batch can hold it; keep the budget at least preprocessing.max_length, which preprocessing already "
            "sets aside (or cuts) longer records at"
        )


def _fill(rows: list[int], lengths: list[int], max_tokens: int, packed: bool) -> list[list[int]]:
    """Rows sorted by length, filled greedily: a micro-batch closes when the next row would break the budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    total = longest = 0
    for row in rows:
        length = lengths[row]
        if current and _cost(len(current) + 1, total + length, max(longest, length), packed) > max_tokens:
            batches.append(current)
            current, total, longest = [], 0, 0
        current.append(row)
        total, longest = total + length, max(longest, length)
    return [*batches, current]


def _deal_evenly(batches: list[list[int]], world_size: int, modality: str, max_tokens: int) -> list[list[int]]:
    """The micro-batches with the most rows split in two until their count is a multiple of ``world_size``."""
    rows = sum(len(batch) for batch in batches)
    if rows < world_size:
        raise ValueError(
            f"{rows} {modality} row(s) for {world_size} processes: every process must take a micro-batch of each "
            f"modality at the same step; add {modality} records (at least {world_size}), set them aside, or train on "
            "fewer processes"
        )
    batches = list(batches)
    for _ in range(-len(batches) % world_size):
        widest = max(range(len(batches)), key=lambda b: len(batches[b]))
        if len(batches[widest]) < 2:
            raise ValueError(
                f"the {rows} {modality} rows each fill a micro-batch of sft.max_tokens_per_batch {max_tokens} on "
                f"their own, and {rows} micro-batches do not divide among {world_size} processes without repeating "
                "a row: raise sft.max_tokens_per_batch so that rows can share a micro-batch, or train on a number "
                f"of processes that divides {rows}"
            )
        half = (len(batches[widest]) + 1) // 2
        batches[widest : widest + 1] = [batches[widest][:half], batches[widest][half:]]
    return batches


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """A DataLoader's ``batch_sampler``: the fixed partition of ``micro_batches``, in a new order each epoch.

    The order moves whole global batches (``world_size`` consecutive micro-batches, one modality), shuffled with
    ``seed + epoch``. The Trainer calls ``set_epoch`` before every pass; without it, each pass moves on to the next
    epoch by itself."""

    def __init__(
        self,
        lengths: list[int],
        has_images: list[bool],
        max_tokens: int,
        seed: int,
        world_size: int = 1,
        packed: bool = False,
    ):
        super().__init__()
        self.batches = micro_batches(lengths, has_images, max_tokens, world_size, packed)
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        global_batches = [self.batches[s : s + self.world_size] for s in range(0, len(self.batches), self.world_size)]
        for g in torch.randperm(len(global_batches), generator=generator).tolist():
            yield from (list(batch) for batch in global_batches[g])
