"""Llama 3.1 (text-only ``LlamaForCausalLM``) and the Llama 3 chat format shared with Llama 3.2-Vision."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vlm_pipeline.architectures.base import Architecture, generation_config, token_id, write_atomically
from vlm_pipeline.architectures.tokenizer import train_tokenizer

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
EOM = "<|eom_id|>"
EOT = "<|eot_id|>"
# Llama 3's named special tokens (the real vocabulary also holds ~250 reserved ones the tiny model does not need).
SPECIAL_TOKENS = (
    BEGIN_OF_TEXT, END_OF_TEXT, PAD, "<|start_header_id|>", "<|end_header_id|>", EOM, EOT, "<|python_tag|>"
)  # fmt: skip

# Each assistant turn's text and its <|eot_id|> sit inside {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the tokens to train on.
_TEMPLATE = """\
{%- macro render(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part['type'] == 'image' -%}
                {{- IMAGE_PART -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{{- '<|begin_of_text|>' -}}
{%- for message in messages -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}
            {{- render(message['content']) + '<|eot_id|>' -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- render(message['content']) + '<|eot_id|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}
"""


def llama3_chat_template(image_token: str | None) -> str:
    """The Llama 3.1 / 3.2-Vision chat template; image parts become ``image_token`` (an error when None)."""
    text_only = "raise_exception('this model is text-only: image parts are not supported')"
    image_part = f"'{image_token}'" if image_token else text_only
    return _TEMPLATE.replace("IMAGE_PART", image_part)


def llama3_tokenizer(image_token: str | None = None) -> PreTrainedTokenizerFast:
    """Llama 3 conventions: BOS prepended to plain text, ``<|eot_id|>`` ends a turn, the fine-tune pad as pad.

    ``image_token`` (Llama 3.2-Vision's ``<|image|>``) is added last, so it gets the highest id as in the real
    vocabulary."""
    return train_tokenizer(
        SPECIAL_TOKENS + ((image_token,) if image_token else ()),
        bos_token=BEGIN_OF_TEXT,
        eos_token=EOT,  # as in the Instruct checkpoints: generation and templates end turns with <|eot_id|>
        pad_token=PAD,
        chat_template=llama3_chat_template(image_token),
        prepend_bos=True,
    )


def llama3_generation_config(tokenizer: PreTrainedTokenizerFast):
    """Stop on end-of-text, end-of-message or end-of-turn, as Llama 3.1/3.2 Instruct do."""
    return generation_config(
        bos_token_id=token_id(tokenizer, BEGIN_OF_TEXT),
        eos_token_ids=[token_id(tokenizer, t) for t in (END_OF_TEXT, EOM, EOT)],
        pad_token_id=token_id(tokenizer, PAD),
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
    tokenizer = llama3_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer))
    model.generation_config = llama3_generation_config(tokenizer)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return write_atomically(out_dir, save)


ARCHITECTURE = Architecture(
    name="llama",
    model_type="llama",
    is_vision=False,
    model_class=LlamaForCausalLM,
    image_token=None,
    end_of_turn_token=EOT,
    build_tiny=build_tiny,
    components=(("language_model", "model."), ("language_model", "lm_head.")),
)
