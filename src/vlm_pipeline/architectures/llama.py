"""Llama 3.1 (text-only ``LlamaForCausalLM``) and the Llama 3 tokenizer conventions shared with Llama 3.2-Vision.

The tiny twin carries Llama-3.1-8B-Instruct's chat template verbatim (``Today Date`` included, so
``preprocessing.template_kwargs.date_string`` pins it), its stop tokens, and its tokenizer's missing pad token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vlm_pipeline.architectures.base import (
    Architecture,
    RealCheckpointFiles,
    restarting_positions,
    token_id,
    write_atomically,
)
from vlm_pipeline.architectures.tokenizer import LLAMA3_SPLIT, train_tokenizer

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
EOM = "<|eom_id|>"
EOT = "<|eot_id|>"
# Llama 3's named special tokens (the real vocabulary also holds ~250 reserved ones the tiny model does not need).
SPECIAL_TOKENS = (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    PAD,
    "<|start_header_id|>",
    "<|end_header_id|>",
    EOM,
    EOT,
    "<|python_tag|>",
)

REAL = RealCheckpointFiles("llama-3.1-8b-instruct")


def llama3_tokenizer(real: RealCheckpointFiles, chat_template: str) -> PreTrainedTokenizerFast:
    """Llama 3 conventions from ``real``'s special-token table: BOS prepended to plain text, ``<|eot_id|>`` as
    EOS, the pad token as the checkpoint sets it (none for Llama 3.1 Instruct). An image token (Llama
    3.2-Vision's ``<|image|>``) is added last, so it gets the highest id as in the real vocabulary."""
    tokens = real.special_tokens
    image_token = tokens["image_token"]
    return train_tokenizer(
        SPECIAL_TOKENS + ((image_token,) if image_token else ()),
        bos_token=tokens["bos_token"],
        eos_token=tokens["eos_token"],
        pad_token=tokens["pad_token"],
        chat_template=chat_template,
        split_pattern=LLAMA3_SPLIT,
        prepend_bos=True,
    )


def llama3_rope_parameters() -> dict:
    """Llama 3.1's "llama3" RoPE scaling (frequencies only, so it costs nothing in a tiny model)."""
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """Llama 3.1's layout (GQA, SwiGLU, llama3 RoPE, untied head) at toy width and depth."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=llama3_rope_parameters(),
        bos_token_id=token_id(tokenizer, BEGIN_OF_TEXT),
        eos_token_id=[token_id(tokenizer, t) for t in (END_OF_TEXT, EOM, EOT)],
        pad_token_id=token_id(tokenizer, PAD),
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama 3.1 with its tokenizer to ``out_dir`` (atomically); deterministic per seed."""
    tokenizer = llama3_tokenizer(REAL, REAL.chat_template())
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer))
    model.generation_config = REAL.generation_config(tokenizer)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return write_atomically(out_dir, save)


def vision_tokens_per_image(bounds: dict) -> int:
    """Text-only: no vision tower, so no image ever costs it a token."""
    return 0


ARCHITECTURE = Architecture(
    name="llama",
    model_type="llama",
    is_vision=False,
    model_class=LlamaForCausalLM,
    image_token=None,
    end_of_turn_token=EOT,
    fine_tune_pad_token=PAD,
    real_checkpoint=REAL,
    build_tiny=build_tiny,
    vision_tokens_per_image=vision_tokens_per_image,
    components=(("language_model", "model."), ("language_model", "lm_head.")),
    packed_position_ids=restarting_positions,
)
