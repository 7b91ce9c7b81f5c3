"""Tokens and seconds per optimizer step: what a GPU run is judged by, measured where it happens.

``ThroughputMeter`` counts each micro-batch the trainer runs (``count``, called from ``training_step``) and, as a
Trainer callback, closes an optimizer step's record at ``on_step_end``: wall seconds since the previous step
ended (data loading included, the device synchronised first), tokens fed (pad included), real tokens (not pad),
trained tokens (labels not ignored), the sum of squared row lengths (attention's cost grows with it) and the
vision tower's input. Counting adds no synchronisation of its own: the sums stay on the device until the step
ends, and the Trainer already synchronises every step (its non-finite loss check). The trainer writes the records
to ``throughput.json`` beside the model; ``bench/gpu.py`` reads the same records for our trainer and for a plain
TRL script that uses this meter too.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import TrainerCallback

from vlm_pipeline.architectures.mllama import PATCH_SIZE as MLLAMA_PATCH_SIZE
from vlm_pipeline.data.encoding import IGNORE_INDEX

COUNTS = ("tokens", "real_tokens", "trained_tokens", "length_squares", "vision_patches", "vision_patch_squares")


def batch_counts(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """This micro-batch's counts as 0-d tensors on its device (no host synchronisation)."""
    input_ids = inputs["input_ids"]
    counts = {"tokens": torch.tensor(input_ids.numel(), device=input_ids.device)}
    mask = inputs.get("attention_mask")
    if mask is not None:
        lengths = mask.sum(dim=-1)
        counts["real_tokens"] = lengths.sum()
        counts["length_squares"] = (lengths.long() ** 2).sum()
    else:  # padding-free: one row of sequences whose position_ids restart at 0; sum over a sequence of 2p+1 is n²
        positions = inputs["position_ids"]
        if positions.dim() == 3:  # Qwen2.5-VL's [4, 1, L]: row 0 holds the restarting text positions
            positions = positions[0]
        counts["real_tokens"] = counts["tokens"]
        counts["length_squares"] = (2 * positions.long() + 1).sum()
    counts["trained_tokens"] = (inputs["labels"] != IGNORE_INDEX).sum()
    grid = inputs.get("image_grid_thw")  # Qwen2.5-VL: (images, 3), the patches of each image as t × h × w
    pixels = inputs.get("pixel_values")
    if grid is not None:
        patches = grid.long().prod(dim=-1)
        counts["vision_patches"] = patches.sum()
        counts["vision_patch_squares"] = (patches**2).sum()
    elif pixels is not None and pixels.dim() == 6:
        # Mllama: (rows, images, tiles, channels, height, width). The tower encodes every tile slot, padding
        # included (the model needs all max_num_tiles), its patches plus a class token each; an image's tiles
        # attend to each other.
        rows, images, tiles = pixels.shape[:3]
        per_image = tiles * ((pixels.shape[-1] // MLLAMA_PATCH_SIZE) ** 2 + 1)
        counts["vision_patches"] = torch.tensor(rows * images * per_image, device=pixels.device)
        counts["vision_patch_squares"] = torch.tensor(rows * images * per_image**2, device=pixels.device)
    return counts


class ThroughputMeter(TrainerCallback):
    """Per optimizer step: seconds and the counts of the micro-batches it ran (see the module's docstring)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._last: float | None = None

    def count(self, inputs: dict[str, Any]) -> None:
        for name, value in batch_counts(inputs).items():
            self._pending[name] = self._pending[name] + value if name in self._pending else value

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        record = {"step": state.global_step, "seconds": now - self._last}
        record.update({name: int(self._pending[name]) if name in self._pending else 0 for name in COUNTS})
        self.steps.append(record)
        self._pending = {}
        self._last = now

    def summary(self) -> dict[str, Any]:
        """The per-step records and the device's peak allocated memory (what the planner's estimate predicts)."""
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return {"steps": self.steps, "max_memory_allocated": peak}


class MeteredTraining:
    """Mixin for a transformers ``Trainer``: a ``ThroughputMeter`` (``self.throughput``) that sees every micro-batch.

    Our trainer uses it, and so does the plain TRL side of ``bench/gpu.py``, so both are measured the same way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.throughput = ThroughputMeter()
        self.add_callback(self.throughput)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.throughput.count(inputs)
        return super().training_step(model, inputs, num_items_in_batch)
