"""Batch collation for pre-tokenised records: pad text, load images and video frames, add the architecture's
pixel inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm_pipeline.architectures import Architecture
from vlm_pipeline.data.encoding import IGNORE_INDEX
from vlm_pipeline.data.video_sampling import load_samples, row_samples


@dataclass
class SFTCollator:
    """Right-pads ``input_ids``/``labels`` and computes pixel inputs in the batch (not stored in Arrow).

    Pixels are computed here rather than at preprocessing so the Arrow files stay small for datasets with
    hundreds of thousands of images; token counts were already fixed by the real processor upstream.
    """

    processor: Any
    architecture: Architecture
    image_root: Path
    padding_free: bool = False
    """Pack the batch's records into one row with no padding, each at the positions it would have alone
    (``Architecture.packed_position_ids``), so that no record attends to another."""
    model_config: Any = None
    """The model's config, for packed rows with video (Qwen2.5-VL's temporal positions read its
    ``tokens_per_second``); padded batches do not read it."""

    def __post_init__(self) -> None:
        self.architecture.padding_free(self.padding_free)  # a family that cannot pack refuses it

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return self._pack(rows)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch.update(self._media_inputs(rows, input_ids))
        return batch

    def _pack(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        # No attention mask: transformers then reads the records' boundaries from the restarting position ids
        # (a block-diagonal mask for sdpa, eager and flex attention, variable lengths for flash attention). That
        # holds only without a KV cache (the trainer sets use_cache=False).
        input_ids, labels = [], []
        for row in rows:
            input_ids += row["input_ids"]
            # A record's first label is never predicted from the previous record's last token.
            labels += [IGNORE_INDEX, *row["labels"][1:]]
        batch = {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels])}
        media = self._media_inputs(rows, batch["input_ids"])  # the images and videos in record order
        batch.update(media)
        batch["position_ids"] = self.architecture.packed_position_ids(
            self.processor, [row["input_ids"] for row in rows], media, self.model_config
        )
        return batch

    def _media_inputs(self, rows: list[dict], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs: dict[str, torch.Tensor] = {}
        image_lists = [[self._load(path) for path in row.get("image_paths", [])] for row in rows]
        if self.architecture.is_vision and any(image_lists):
            inputs.update(self.architecture.image_inputs(self.processor, image_lists, input_ids))
        video_lists = [load_samples(row_samples(row), self.image_root) for row in rows]
        if any(video_lists):  # the frames preprocessing sampled and counted, by the indices in the row
            inputs.update(self.architecture.video_inputs(self.processor, video_lists, input_ids))
        return inputs

    def _load(self, relative: str) -> Image.Image:
        with Image.open(self.image_root / relative) as image:
            return image.convert("RGB")
