"""A quantized base for LoRA (8-bit, or 4-bit NF4 with double quantization: QLoRA) through bitsandbytes.

Only the language model is quantized by default: the vision tower, the projector and lm_head stay in full
precision (``llm_int8_skip_modules`` with the architecture's full dotted prefixes). Vision towers are small
next to the language model, sensitive to quantization, and on CPUs bitsandbytes cannot repack layers narrower
than 64 inputs, which tiny vision towers have.
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import BitsAndBytesConfig

from vlm_pipeline.architectures import Architecture
from vlm_pipeline.config.schema import QuantizationParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantizationUnavailable(RuntimeError):
    """bitsandbytes is missing: raised before any model loads, naming the parameter that asked for it."""


def default_skip_modules(architecture: Architecture) -> list[str]:
    """Full dotted names of everything but the language model's layers: vision parts and the output head."""
    prefixes = [prefix.rstrip(".") for component, prefix in architecture.components if component != "language_model"]
    return [*prefixes, "lm_head"]


def bits_and_bytes_config(quantization: QuantizationParams, architecture: Architecture) -> BitsAndBytesConfig:
    """transformers' BitsAndBytesConfig from ``method.quantization`` (its own field names)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailable("method.quantization needs bitsandbytes, which is not installed")
    settings = quantization.model_dump()
    settings["bnb_4bit_compute_dtype"] = DTYPES[settings["bnb_4bit_compute_dtype"]]
    settings["llm_int8_skip_modules"] = settings["llm_int8_skip_modules"] or default_skip_modules(architecture)
    return BitsAndBytesConfig(**settings)
