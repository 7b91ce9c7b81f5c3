"""The seeds' four recipes: which conf environment and pipeline each is, and its CPU smoke-test override.

A recipe is a Kedro conf environment (``conf/<env>/``) carrying the seed's values. ``cpu_smoke_params`` is
the override that runs it end to end on a laptop: it swaps only the model path (a tiny model of the same
architecture), the accelerate file (one CPU process), the attention kernel (sdpa), batch sizes and step counts.
Precision, optimizer, schedule, LoRA and evaluation settings stay the recipe's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    env: str
    """Kedro conf environment (``--env``) holding the recipe's parameters."""
    pipeline: str
    """Registered pipeline it runs: ``full_ft`` or ``lora``."""
    architecture: str
    """Architecture of its real model, and so of the tiny model its CPU smoke run uses."""
    summary: str
    model_config: str
    """Folder with the real model's config.json (published dimensions, no weights), for ``vlm-pipeline plan``."""


MLLAMA_11B = "conf/model_configs/llama-3.2-11b-vision-instruct"
RECIPES: dict[str, Recipe] = {
    "a": Recipe(
        "llama_vision_full_ft",
        "full_ft",
        "mllama",
        "Llama-3.2-11B-Vision full FT, 8×80 GB, DeepSpeed ZeRO-3",
        MLLAMA_11B,
    ),
    "b": Recipe(
        "llama_vision_lora", "lora", "mllama", "Llama-3.2-11B-Vision LoRA on an 8-bit base, one A100", MLLAMA_11B
    ),
    "c": Recipe(
        "qwen_vl_fsdp",
        "full_ft",
        "qwen2_5_vl",
        "Qwen2.5-VL full FT, FSDP, bf16, Adafactor",
        "conf/model_configs/qwen2.5-vl-7b-instruct",
    ),
    "d": Recipe(
        "llama_text_lora",
        "lora",
        "llama",
        "Llama-3.1-8B LoRA from alpaca JSONL",
        "conf/model_configs/llama-3.1-8b-instruct",
    ),
    "b-qlora": Recipe("llama_vision_qlora", "lora", "mllama", "recipe (b) over a 4-bit NF4 base (QLoRA)", MLLAMA_11B),
}

CPU_SMOKE_STEPS = 4


def cpu_smoke_params(tiny_model: str) -> dict[str, Any]:
    """Runtime parameters that shrink any recipe to a few steps of one CPU process on ``tiny_model``."""
    return {
        "base_model": tiny_model,
        "model": {"attn_implementation": "sdpa"},  # flash-attn kernels run on GPUs only
        "sft": {
            "accelerate_config": "conf/accelerate/cpu_single_process.yaml",
            "max_steps": CPU_SMOKE_STEPS,
            "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "logging_steps": 1,
            "eval_steps": 2,
            "save_steps": 2,
            "dataloader_num_workers": 0,
            "dataloader_pin_memory": False,
        },
        "evaluation": {"max_new_tokens": 4},
    }


def as_cli_params(params: dict[str, Any], prefix: str = "") -> str:
    """``params`` as ``kedro run --params`` text: dotted keys, comma-separated."""
    items = []
    for key, value in params.items():
        if isinstance(value, dict):
            items.append(as_cli_params(value, f"{prefix}{key}."))
        else:
            items.append(f"{prefix}{key}={str(value).lower() if isinstance(value, bool) else value}")
    return ",".join(items)
