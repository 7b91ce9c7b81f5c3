"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): ChatML chat format, image placeholders expanded per patch.

The tiny twin carries Qwen2.5-VL-7B-Instruct's chat template and processor settings verbatim
(``conf/model_configs/qwen2.5-vl-7b-instruct/``) with tiny weights and a locally trained tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from vlm_pipeline.architectures.base import (
    Architecture,
    RealCheckpointFiles,
    token_id,
    write_atomically,
)
from vlm_pipeline.architectures.tokenizer import QWEN2_SPLIT, train_tokenizer

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, VIDEO_PAD)

REAL = RealCheckpointFiles("qwen2.5-vl-7b-instruct")
PATCH_SIZE = 14  # the real vision tower's patch edge (preprocessor_config.json ``patch_size``)
# The image the planner assumes where preprocessing.images sets no max_pixels: 1024×1024 (the checkpoint's own
# limit, ~12.8M pixels, would plan every run for images few datasets hold).
DEFAULT_PLANNED_PIXELS = 1024 * 1024
TEXT_HIDDEN = 64
TEXT_HEADS = 4


def tiny_processor() -> Qwen2_5_VLProcessor:
    """The real processor classes, settings and chat template (verbatim), and Qwen's special tokens (no BOS)."""
    tokens = REAL.special_tokens
    template = REAL.chat_template()
    tokenizer = train_tokenizer(
        SPECIAL_TOKENS,
        bos_token=tokens["bos_token"],
        eos_token=tokens["eos_token"],
        pad_token=tokens["pad_token"],
        chat_template=template,
        split_pattern=QWEN2_SPLIT,
    )
    settings = REAL.image_processor_settings()
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**settings),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**settings),  # required by the 5.x processor
        chat_template=template,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL's layout at toy size; the special-token ids must be the tokenizer's for the model to find images."""
    head_dim = TEXT_HIDDEN // TEXT_HEADS
    settings = REAL.image_processor_settings()
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "max_window_layers": 2,
        "rms_norm_eps": 1e-6,
        # M-RoPE splits each head's rotary half into (temporal, height, width) sections; they must sum to
        # head_dim / 2. Real: [16, 24, 24] of 64; the same proportions here.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": token_id(tokenizer, END_OF_TEXT),
        "eos_token_id": token_id(tokenizer, IM_END),
        "pad_token_id": token_id(tokenizer, END_OF_TEXT),
    }
    assert sum(text_config["rope_parameters"]["mrope_section"]) == head_dim // 2
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": settings["patch_size"],
        "spatial_merge_size": settings["merge_size"],
        "temporal_patch_size": settings["temporal_patch_size"],
        "window_size": 112,
        "fullatt_block_indexes": [1],  # last block full attention, the others windowed, as in the real tower
        "out_hidden_size": TEXT_HIDDEN,  # the merger projects straight into the text embedding width
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id(tokenizer, IMAGE_PAD),
        video_token_id=token_id(tokenizer, VIDEO_PAD),
        vision_start_token_id=token_id(tokenizer, VISION_START),
        vision_end_token_id=token_id(tokenizer, VISION_END),
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL with its processor to ``out_dir`` (atomically); deterministic per seed."""
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer))
    model.generation_config = REAL.generation_config(tokenizer)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return write_atomically(out_dir, save)


def image_inputs(processor: Any, images: list[list[Any]], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixel_values``/``image_grid_thw`` for a tokenised batch, plus ``mm_token_type_ids``.

    The image processor alone takes the flat list of every row's images in order. In transformers 5 the model
    builds its 3-D M-RoPE positions only when ``mm_token_type_ids`` (1 at image tokens, 2 at video tokens) is
    passed; without it positions silently fall back to 1-D.
    """
    flat = [image for row in images for image in row]
    encoded = processor.image_processor(images=flat, return_tensors="pt")
    return {
        "pixel_values": encoded["pixel_values"],
        "image_grid_thw": encoded["image_grid_thw"],
        "mm_token_type_ids": media_token_types(processor, input_ids),
    }


def video_inputs(processor: Any, videos: list[list[Any]], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixel_values_videos``/``video_grid_thw``/``second_per_grid_ts`` for a tokenised batch: each row's videos
    as ``SampledVideo`` (its frames and the rate they were sampled at), plus ``mm_token_type_ids``.

    The frames were sampled already (``data/video_sampling.py``), so the video processor takes them as they are;
    ``second_per_grid_ts`` (seconds per temporal patch) comes from their sampled rate, not the processor's
    assumed 24 fps, so the model's temporal positions follow the clip's real time as in Qwen's own training."""
    flat = [video for row in videos for video in row]
    encoded = processor.video_processor(videos=[video.frames for video in flat], return_tensors="pt")
    temporal = processor.video_processor.temporal_patch_size
    return {
        "pixel_values_videos": encoded["pixel_values_videos"],
        "video_grid_thw": encoded["video_grid_thw"],
        "second_per_grid_ts": torch.tensor([temporal / video.sampled_fps for video in flat]),
        "mm_token_type_ids": media_token_types(processor, input_ids),
    }


def media_token_types(processor: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """1 at image placeholder tokens, 2 at video placeholder tokens, 0 elsewhere (the model's modality ids)."""
    convert = processor.tokenizer.convert_tokens_to_ids
    return (input_ids == convert(IMAGE_PAD)).long() + 2 * (input_ids == convert(VIDEO_PAD)).long()


def packed_position_ids(processor: Any, rows: list[list[int]], image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """``[4, 1, L]`` position ids of records packed into one row, the layout Qwen2.5-VL reads packed input from.

    Row 0 holds text positions that restart at each record: transformers builds the block-diagonal mask (or
    flash attention's variable lengths) from them. Rows 1-3 are each record's own M-RoPE (temporal, height, width)
    positions, as the model computes them for that record alone (``get_rope_index``): text advances all three by
    one per token; an image's tokens take its grid's coordinates (after the 2×2 merge) offset by the position
    reached, which then moves on by the grid's larger side. ``image_grid_thw`` lists the row's images in order.
    """
    merge = processor.image_processor.merge_size
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    text = [torch.arange(len(ids)) for ids in rows]
    rope = [_record_rope_positions(ids, image_token_id, grids, merge) for ids in rows]
    if next(grids, None) is not None:
        raise ValueError("packed row: more images than image-token runs in its records")
    return torch.cat([torch.cat(text)[None], torch.cat(rope, dim=1)])[:, None, :]


def _record_rope_positions(ids: list[int], image_token_id: int, grids: Any, merge: int) -> torch.Tensor:
    pieces, position, start = [], 0, 0
    while start < len(ids):
        if ids[start] == image_token_id:
            grid = next(grids, None)
            if grid is None:
                raise ValueError("packed row: an image-token run has no image")
            frames, height, width = grid[0], grid[1] // merge, grid[2] // merge
            end = start + frames * height * width
            if ids[start:end].count(image_token_id) != end - start:
                raise ValueError(f"packed row: an image of grid {grid} needs {end - start} image tokens in a run")
            t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
            pieces.append(torch.stack([t, h, w]).reshape(3, -1) + position)
            position += max(height, width)
        else:
            end = start
            while end < len(ids) and ids[end] != image_token_id:
                end += 1
            pieces.append(torch.arange(position, position + end - start).expand(3, -1))
            position += end - start
        start = end
    return torch.cat(pieces, dim=1)


def bound_images(processor: Any, bounds: dict) -> None:
    """Resize every image to between ``min_pixels`` and ``max_pixels`` (Qwen's own default max is ~12.8M)."""
    size = dict(processor.image_processor.size)
    if bounds.get("min_pixels") is not None:
        size["shortest_edge"] = bounds["min_pixels"]
    if bounds.get("max_pixels") is not None:
        size["longest_edge"] = bounds["max_pixels"]
    processor.image_processor.size = size


def bound_videos(processor: Any, sampling: dict) -> None:
    """Frame size limits for video (``preprocessing.videos``): ``min_pixels``/``max_pixels`` per frame, and
    ``total_pixels`` for all sampled frames together through the processor's per-frame cap (Qwen's reference
    behaviour, on for every video: transformers 5 warns that it becomes its default)."""
    video_processor = processor.video_processor
    size = dict(video_processor.size)
    if sampling.get("min_pixels") is not None:
        size["shortest_edge"] = sampling["min_pixels"]
    if sampling.get("max_pixels") is not None:
        size["longest_edge"] = sampling["max_pixels"]
    video_processor.size = size
    video_processor.cap_pixels_per_frame = True
    if sampling.get("total_pixels") is not None:
        # The processor's budget is 90% of max_video_tokens merged patches of 28×28 pixels.
        unit = (video_processor.patch_size * video_processor.merge_size) ** 2
        video_processor.max_video_tokens = math.ceil(sampling["total_pixels"] / (unit * 0.9))


def video_tokens(processor: Any, frames: int, height: int, width: int) -> int:
    """Language-model tokens the (bounded) processor gives a video of ``frames`` sampled frames of ``height`` ×
    ``width``: the planner's count, from sizes alone.

    The processor's own rule from sizes (``get_num_of_video_patches``, what vLLM calls) leaves out the per-frame
    share of ``max_video_tokens`` its processing applies (``cap_pixels_per_frame``), so the share is worked out here
    as the processing works it out, and handed to the rule as the frame's largest size."""
    video_processor = processor.video_processor
    size = dict(video_processor.size)
    merge = video_processor.merge_size
    if video_processor.cap_pixels_per_frame:
        factor = video_processor.patch_size * merge
        total = int(video_processor.max_video_tokens * factor * factor * 0.9)
        share = total * video_processor.temporal_patch_size // frames
        size["longest_edge"] = max(min(size["longest_edge"], share), int(size["shortest_edge"] * 1.05))
    patches = video_processor.get_num_of_video_patches(frames, height, width, {"size": size})
    return patches // (merge * merge)


def vision_tokens_per_image(bounds: dict) -> int:
    """Patches the vision tower sees for the largest image ``bounds`` allow: ``max_pixels`` / 14², or those of a
    1024×1024 image where unbounded (counted before the 2×2 merge into language-model tokens)."""
    return (bounds.get("max_pixels") or DEFAULT_PLANNED_PIXELS) // (PATCH_SIZE * PATCH_SIZE)


ARCHITECTURE = Architecture(
    name="qwen2_5_vl",
    model_type="qwen2_5_vl",
    is_vision=True,
    model_class=Qwen2_5_VLForConditionalGeneration,
    image_token=IMAGE_PAD,
    end_of_turn_token=IM_END,
    fine_tune_pad_token=None,
    real_checkpoint=REAL,
    build_tiny=build_tiny,
    vision_tokens_per_image=vision_tokens_per_image,
    components=(
        ("projector", "model.visual.merger."),
        ("vision_tower", "model.visual."),
        ("language_model", "model.language_model."),
        ("language_model", "lm_head."),
    ),
    image_inputs=image_inputs,
    video_inputs=video_inputs,
    bound_videos=bound_videos,
    video_tokens=video_tokens,
    packed_position_ids=packed_position_ids,
    bound_images=bound_images,
    image_bound_fields=("min_pixels", "max_pixels"),
    vision_mlp_gated=True,  # SwiGLU blocks (gate_proj, up_proj, down_proj)
)
