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
        # How far apart a video's temporal patches sit in M-RoPE, per second of clip: behaviour, not size.
        "tokens_per_second": REAL.json("config.json")["vision_config"]["tokens_per_second"],
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


def packed_position_ids(
    processor: Any, rows: list[list[int]], media: dict[str, torch.Tensor], model_config: Any = None
) -> torch.Tensor:
    """``[4, 1, L]`` position ids of records packed into one row, the layout Qwen2.5-VL reads packed input from.

    Row 0 holds text positions that restart at each record: transformers builds the block-diagonal mask (or
    flash attention's variable lengths) from them. Rows 1-3 are each record's own M-RoPE (temporal, height, width)
    positions, as the model computes them for that record alone (``get_rope_index``): text advances all three by
    one per token; an image's or a video's tokens take its grid's coordinates (after the 2×2 merge) offset by the
    position reached, which then moves on by the grid's larger side. A video's temporal coordinate steps by its
    seconds per temporal patch × the model's ``tokens_per_second`` (``model_config.vision_config``), so a packed
    clip keeps its real time. ``media`` is the batch's pixel inputs (``image_grid_thw``, ``video_grid_thw``,
    ``second_per_grid_ts``), which list the row's images and videos in order.
    """
    merge = processor.image_processor.merge_size
    convert = processor.tokenizer.convert_tokens_to_ids
    runs = {convert(IMAGE_PAD): _VisionRuns("image", media.get("image_grid_thw"), None)}
    if media.get("video_grid_thw") is not None:
        if model_config is None:
            raise ValueError("packed video rows need the model's config: its tokens_per_second times their frames")
        per_second = model_config.vision_config.tokens_per_second
        runs[convert(VIDEO_PAD)] = _VisionRuns(
            "video", media["video_grid_thw"], media["second_per_grid_ts"] * per_second
        )
    text = [torch.arange(len(ids)) for ids in rows]
    rope = [_record_rope_positions(ids, runs, merge) for ids in rows]
    for kind in runs.values():
        kind.check_used()
    return torch.cat([torch.cat(text)[None], torch.cat(rope, dim=1)])[:, None, :]


class _VisionRuns:
    """The grids (and, for video, temporal steps) of one kind of vision input, handed out run by run in order."""

    def __init__(self, kind: str, grids: torch.Tensor | None, intervals: torch.Tensor | None) -> None:
        self.kind = kind
        self.grids = iter(grids.tolist() if grids is not None else [])
        self.intervals = iter(intervals) if intervals is not None else None

    def next_grid(self) -> tuple[list[int], Any]:
        grid = next(self.grids, None)
        if grid is None:
            raise ValueError(f"packed row: a run of {self.kind} tokens has no {self.kind}")
        return grid, next(self.intervals) if self.intervals is not None else 1

    def check_used(self) -> None:
        if next(self.grids, None) is not None:
            raise ValueError(f"packed row: more {self.kind}s than {self.kind}-token runs in its records")


def _record_rope_positions(ids: list[int], runs: dict[int, _VisionRuns], merge: int) -> torch.Tensor:
    pieces, position, start = [], 0, 0
    while start < len(ids):
        token = ids[start]
        if token in runs:
            grid, interval = runs[token].next_grid()
            frames, height, width = grid[0], grid[1] // merge, grid[2] // merge
            end = start + frames * height * width
            if ids[start:end].count(token) != end - start:
                raise ValueError(f"packed row: a grid of {grid} needs {end - start} of its tokens in a run")
            # As get_vision_position_ids: temporal steps scaled before rounding down; an image's interval is 1.
            temporal = (torch.arange(frames) * interval).long()
            t, h, w = torch.meshgrid(temporal, torch.arange(height), torch.arange(width), indexing="ij")
            pieces.append(torch.stack([t, h, w]).reshape(3, -1) + position)
            position += max(height, width)
        else:
            end = start
            while end < len(ids) and ids[end] not in runs:
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
    behaviour, on for every video: transformers 5 warns that it becomes its default). The frame sampling (``fps``,
    ``min_frames``, ``max_frames``) goes into the video processor's own fields of those names, so a saved folder
    says how its run sampled (``video_sampling.saved_sampling``; servers read them too); the processor still
    samples nothing itself (``do_sample_frames`` stays off: the frames come sampled)."""
    video_processor = processor.video_processor
    for name in ("fps", "min_frames", "max_frames"):
        if sampling.get(name) is not None:
            setattr(video_processor, name, sampling[name])
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
