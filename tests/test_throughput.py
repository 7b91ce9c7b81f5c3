"""The step meter our trainer and bench/gpu.py's plain TRL side share: counts per batch, records per step."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vlm_pipeline.data.encoding import IGNORE_INDEX
from vlm_pipeline.training.throughput import COUNTS, ThroughputMeter, batch_counts

LENGTHS = (3, 5)


def padded_batch() -> dict[str, torch.Tensor]:
    width = max(LENGTHS)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in LENGTHS])
    labels = torch.full(mask.shape, IGNORE_INDEX)
    labels[0, 2], labels[1, 3:5] = 7, 8  # three trained tokens
    return {"input_ids": torch.ones_like(mask), "attention_mask": mask, "labels": labels}


def flat_batch() -> dict[str, torch.Tensor]:
    """The same two rows as the padding-free collator lays them out: one row, restarting position_ids."""
    positions = torch.tensor([[p for n in LENGTHS for p in range(n)]])
    labels = torch.full(positions.shape, IGNORE_INDEX)
    labels[0, 2], labels[0, 6:8] = 7, 8
    return {"input_ids": torch.ones_like(positions), "position_ids": positions, "labels": labels}


def test_padded_and_padding_free_batches_count_the_same_real_tokens():
    padded = {name: int(value) for name, value in batch_counts(padded_batch()).items()}
    flat = {name: int(value) for name, value in batch_counts(flat_batch()).items()}
    assert padded == {"tokens": 10, "real_tokens": 8, "length_squares": 9 + 25, "trained_tokens": 3}
    assert flat == {**padded, "tokens": 8}  # no pad tokens fed


def test_vision_inputs_are_counted_per_patch():
    qwen = {**padded_batch(), "image_grid_thw": torch.tensor([[1, 4, 6], [1, 2, 2]])}
    counts = batch_counts(qwen)
    assert (int(counts["vision_patches"]), int(counts["vision_patch_squares"])) == (24 + 4, 24**2 + 4**2)
    # Mllama: 2 rows × 1 image × 4 tile slots of 560 px: (40² + 1) patches a tile, all tiles encoded
    mllama = {**padded_batch(), "pixel_values": torch.zeros(2, 1, 4, 3, 560, 560, dtype=torch.bfloat16)}
    counts = batch_counts(mllama)
    assert int(counts["vision_patches"]) == 2 * 4 * 1601
    assert int(counts["vision_patch_squares"]) == 2 * (4 * 1601) ** 2


def test_each_optimizer_step_sums_its_micro_batches():
    meter = ThroughputMeter()
    meter.on_train_begin(None, None, None)
    for step in (1, 2):
        for _ in range(step):  # step 2 accumulates two micro-batches
            meter.count(padded_batch())
        meter.on_step_end(None, SimpleNamespace(global_step=step), None)
    first, second = meter.steps
    assert set(first) == {"step", "seconds", *COUNTS}
    assert (first["real_tokens"], second["real_tokens"]) == (8, 16)
    assert second["vision_patches"] == 0 and first["seconds"] >= 0
    assert meter.summary()["steps"] == meter.steps
