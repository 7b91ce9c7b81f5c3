"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): ChatML chat format, image placeholders expanded per patch."""

from __future__ import annotations

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

from vlm_pipeline.architectures.base import Architecture, generation_config, token_id, write_atomically
from vlm_pipeline.architectures.tokenizer import train_tokenizer

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, VIDEO_PAD)

PATCH_SIZE = 14
MERGE_SIZE = 2
TEXT_HIDDEN = 64
TEXT_HEADS = 4
MIN_PIXELS = 56 * 56  # smallest resize target; Qwen's resize rejects images under 28 px a side
MAX_PIXELS = 112 * 112  # at most 8x8 patches = 16 merged tokens per image, which keeps the tiny model fast

# ChatML as Qwen2.5-VL writes it: a default system turn, images as <|vision_start|><|image_pad|><|vision_end|>
# (the processor expands <|image_pad|> to one token per merged patch). The assistant text and its <|im_end|>
# sit inside {% generation %} (the "\n" after it does not) so return_assistant_tokens_mask marks them.
CHAT_TEMPLATE = """\
{%- macro render(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part['type'] == 'image' -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif part['type'] == 'video' -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages[0]['role'] != 'system' -%}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\\n' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}
            {{- render(message['content']) + '<|im_end|>' -}}
        {%- endgeneration -%}
        {{- '\\n' -}}
    {%- else -%}
        {{- render(message['content']) + '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""


def tiny_processor() -> Qwen2_5_VLProcessor:
    """The real processor classes with small resize bounds and Qwen's tokenizer conventions (no BOS)."""
    tokenizer = train_tokenizer(
        SPECIAL_TOKENS, bos_token=None, eos_token=IM_END, pad_token=END_OF_TEXT, chat_template=CHAT_TEMPLATE
    )
    sizes = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    patches = {"patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE, "temporal_patch_size": 2}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes, **patches),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes, **patches),  # required by the 5.x processor
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL's layout at toy size; the special-token ids must be the tokenizer's for the model to find images."""
    head_dim = TEXT_HIDDEN // TEXT_HEADS
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
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
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
    model.generation_config = generation_config(
        bos_token_id=token_id(tokenizer, END_OF_TEXT),
        eos_token_ids=[token_id(tokenizer, IM_END), token_id(tokenizer, END_OF_TEXT)],
        pad_token_id=token_id(tokenizer, END_OF_TEXT),
    )

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return write_atomically(out_dir, save)


def image_inputs(processor: Any, images: list[list[Any]], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixel_values``/``image_grid_thw`` for a tokenised batch, plus ``mm_token_type_ids``.

    The image processor alone takes the flat list of every row's images in order. In transformers 5 the model
    builds its 3-D M-RoPE positions only when ``mm_token_type_ids`` (1 at image tokens) is passed; without it
    positions silently fall back to 1-D.
    """
    flat = [image for row in images for image in row]
    encoded = processor.image_processor(images=flat, return_tensors="pt")
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return {
        "pixel_values": encoded["pixel_values"],
        "image_grid_thw": encoded["image_grid_thw"],
        "mm_token_type_ids": (input_ids == image_token_id).long(),
    }


def bound_images(processor: Any, bounds: dict) -> None:
    """Resize every image to between ``min_pixels`` and ``max_pixels`` (Qwen's own default max is ~12.8M)."""
    size = dict(processor.image_processor.size)
    if bounds.get("min_pixels") is not None:
        size["shortest_edge"] = bounds["min_pixels"]
    if bounds.get("max_pixels") is not None:
        size["longest_edge"] = bounds["max_pixels"]
    processor.image_processor.size = size


ARCHITECTURE = Architecture(
    name="qwen2_5_vl",
    model_type="qwen2_5_vl",
    is_vision=True,
    model_class=Qwen2_5_VLForConditionalGeneration,
    image_token=IMAGE_PAD,
    end_of_turn_token=IM_END,
    build_tiny=build_tiny,
    components=(
        ("projector", "model.visual.merger."),
        ("vision_tower", "model.visual."),
        ("language_model", "model.language_model."),
        ("language_model", "lm_head."),
    ),
    image_inputs=image_inputs,
    bound_images=bound_images,
)
