"""Llama 3.2-Vision (``MllamaForConditionalGeneration``): Llama 3 chat format, images through cross-attention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from vlm_pipeline.architectures.base import Architecture, RealCheckpointFiles, token_id, write_atomically
from vlm_pipeline.architectures.llama import (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    EOM,
    EOT,
    PAD,
    llama3_rope_parameters,
    llama3_tokenizer,
)

REAL = RealCheckpointFiles("llama-3.2-11b-vision-instruct")
# The two published chat templates: the current one, and the September 2024 one (refuses a system message with
# images), which checkpoints downloaded before December 2024 carry.
TEMPLATES = {"current": "chat_template.jinja", "sept2024": "chat_template_alt.jinja"}
PATCH_SIZE = 14
# The real tower's sequence per 560×560 tile: 40×40 patches and a class token. The planner counts the real size.
REAL_TILE_TOKENS = (560 // PATCH_SIZE) ** 2 + 1
REAL_MAX_TILES = 4  # the real processor's max_image_tiles
# The one processor setting the twin shrinks: a tile's pixels are a size, like the hidden widths. At the real
# 560 px a tile is 1,601 patches, and every image is padded to 4 tiles: a CPU step would take seconds.
TILE_SIZE = 56
VISION_HIDDEN = 32
INTERMEDIATE_LAYERS = [0]
GATE_VALUE = 0.5  # tanh(0.5) ~ 0.46: the image clearly reaches the text, without swamping it


def tiny_processor(template: str = "current") -> MllamaProcessor:
    """The real processor classes, settings (at most 4 tiles, CLIP normalisation; tiles of ``TILE_SIZE``) and chat
    template (verbatim)."""
    chat_template = REAL.chat_template(TEMPLATES[template])
    tokenizer = llama3_tokenizer(REAL, chat_template)
    settings = {**REAL.image_processor_settings(), "size": {"height": TILE_SIZE, "width": TILE_SIZE}}
    image_processor = MllamaImageProcessor(**settings)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def supported_aspect_ratios(max_tiles: int) -> list[list[int]]:
    """Every tile arrangement of at most ``max_tiles`` tiles, in the order the image processor numbers them."""
    return [[w, h] for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if w * h <= max_tiles]


def tiny_config(tokenizer: PreTrainedTokenizerFast, image_processor: MllamaImageProcessor) -> MllamaConfig:
    """Llama 3.2-Vision's layout at toy size.

    As in the real checkpoint, ``<|image|>`` lies outside the LM head: ``text_config.vocab_size`` is its id (the
    text embedding has ``vocab_size + 8`` rows, so it can still be embedded, but it can never be predicted).
    """
    image = REAL.special_tokens["image_token"]
    image_id = token_id(tokenizer, image)
    if image_id != len(tokenizer) - 1:
        raise ValueError(f"{image} must be the last token (id {len(tokenizer) - 1}), got id {image_id}")
    vision_config = {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "attention_heads": 2,
        "image_size": image_processor.size["height"],
        "patch_size": PATCH_SIZE,
        "max_num_tiles": image_processor.max_image_tiles,
        "supported_aspect_ratios": supported_aspect_ratios(image_processor.max_image_tiles),
        "intermediate_layers_indices": INTERMEDIATE_LAYERS,
        # The vision output concatenates the final hidden state with each listed intermediate layer.
        "vision_output_dim": VISION_HIDDEN * (1 + len(INTERMEDIATE_LAYERS)),
    }
    text_config = {
        "vocab_size": image_id,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "cross_attention_layers": [1],  # must index one of the text layers
        "max_position_embeddings": 131072,
        "rope_parameters": llama3_rope_parameters(),
        "bos_token_id": token_id(tokenizer, BEGIN_OF_TEXT),
        "eos_token_id": [token_id(tokenizer, t) for t in (END_OF_TEXT, EOM, EOT)],
        "pad_token_id": token_id(tokenizer, PAD),
    }
    return MllamaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_id, dtype="float32"
    )


def open_gates(model: MllamaForConditionalGeneration, value: float = GATE_VALUE) -> None:
    """Set every tanh gate to ``value``.

    Mllama initialises its gates (text cross-attention, tile position embeddings, global vision layers) at
    zero, so a freshly built model ignores the image entirely; trained checkpoints have them open.
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in {"gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate"}:
                parameter.fill_(value)


def build_tiny(out_dir: Path, seed: int = 0, template: str = "current") -> Path:
    """Write a tiny random Llama 3.2-Vision with its processor to ``out_dir`` (atomically); deterministic per seed.

    ``template`` picks one of the two published chat templates (``TEMPLATES``)."""
    processor = tiny_processor(template)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(tiny_config(processor.tokenizer, processor.image_processor))
    open_gates(model)
    model.generation_config = REAL.generation_config(processor.tokenizer)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return write_atomically(out_dir, save)


def image_inputs(processor: Any, images: list[list[Any]], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixel_values``, ``aspect_ratio_ids``, ``aspect_ratio_mask`` and ``cross_attention_mask`` for a tokenised batch.

    The image processor takes the nested per-row lists; the cross-attention mask (which text positions see which
    image tiles) is rebuilt from the padded ``input_ids`` exactly as ``MllamaProcessor.__call__`` does.
    """
    encoded = processor.image_processor(images=images, return_tensors="pt")
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    token_masks = [get_cross_attention_token_mask(row.tolist(), image_token_id) for row in input_ids]
    cross_attention_mask = convert_sparse_cross_attention_mask_to_dense(
        token_masks,
        num_tiles=encoded["num_tiles"],
        max_num_tiles=processor.image_processor.max_image_tiles,
        length=input_ids.shape[1],
    )
    return {
        "pixel_values": encoded["pixel_values"],
        "aspect_ratio_ids": encoded["aspect_ratio_ids"],
        "aspect_ratio_mask": encoded["aspect_ratio_mask"],
        "cross_attention_mask": torch.from_numpy(cross_attention_mask),
    }


def bound_images(processor: Any, bounds: dict) -> None:
    """Refuse a tile bound the model cannot run. The tower encodes every image as exactly the checkpoint's
    ``max_num_tiles`` tiles (smaller images are padded; its tile embeddings are sized for that count), and a
    processor set to any other count fails at the first forward pass, after preprocessing. Checked here, where
    every stage loads its processor, so preprocessing stops on it before anything trains."""
    tiles, own = bounds.get("max_image_tiles"), processor.image_processor.max_image_tiles
    if tiles is not None and tiles != own:
        raise ValueError(
            f"preprocessing.images.max_image_tiles: {tiles}, but this checkpoint encodes every image as {own} "
            f"tiles (its tile embeddings are sized for {own}), and a processor cutting images into {tiles} fails "
            f"at the first training step. Leave it null; an image's vision cost is {own} tiles whatever its size"
        )


def vision_tokens_per_image(bounds: dict) -> int:
    """1,601 per tile for ``max_image_tiles`` tiles (4 where unbounded): every image is padded to that many tiles
    and the tower encodes them all, so this is the count for any image, not a bound."""
    return (bounds.get("max_image_tiles") or REAL_MAX_TILES) * REAL_TILE_TOKENS


ARCHITECTURE = Architecture(
    name="mllama",
    model_type="mllama",
    is_vision=True,
    model_class=MllamaForConditionalGeneration,
    image_token=REAL.special_tokens["image_token"],
    end_of_turn_token=EOT,
    fine_tune_pad_token=PAD,
    real_checkpoint=REAL,
    build_tiny=build_tiny,
    vision_tokens_per_image=vision_tokens_per_image,
    components=(
        ("vision_tower", "model.vision_model."),
        ("projector", "model.multi_modal_projector."),
        ("language_model", "model.language_model."),
        ("language_model", "lm_head."),
    ),
    image_inputs=image_inputs,
    bound_images=bound_images,
    image_bound_fields=("max_image_tiles",),
    vision_mlp_gated=False,  # two layers (fc1, fc2) with GELU
)
