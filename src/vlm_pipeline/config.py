"""Parameter checks that run before anything heavy: names, legacy names, and impossible combinations.

The valid ``sft`` keys are TRL's own ``SFTConfig`` fields (plus the two our launcher consumes), so the schema
never lags behind TRL. Older names from the seed recipes are mapped to today's with a warning, or rejected
with the new name when the meaning moved.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any

logger = logging.getLogger(__name__)

# Keys in `sft` that our launcher consumes; everything else goes to TRL's SFTConfig. (TRL's own
# padding_free refuses a custom collator, so our collator implements it under the same name.)
LAUNCHER_KEYS = {"accelerate_config", "padding_free"}
# Old name -> new name, value unchanged (accepted with a warning).
RENAMED = {
    "evaluation_strategy": "eval_strategy",  # transformers 4.46
    "warmup_ratio": "warmup_steps",  # transformers 5: a float in [0, 1) is a ratio
}
# Old names whose meaning moved elsewhere (rejected, naming where it went).
MOVED = {
    "max_seq_length": "preprocessing.max_length (TRL renamed it max_length; vlm-pipeline checks lengths at "
    "preprocessing, with the real processor)",
    "fp16_opt_level": "nothing: it was apex's AMP level, removed from transformers; use sft.fp16 or sft.bf16",
    "group_by_length": "sft.train_sampling_strategy: group_by_length (transformers 5)",
}


class ConfigError(ValueError):
    """A parameter file names an unknown key or an impossible combination; the message says which and why."""


def sft_field_names() -> set[str]:
    from trl import SFTConfig

    return {field.name for field in dataclasses.fields(SFTConfig)} | LAUNCHER_KEYS


def normalise_sft(sft: dict[str, Any], where: str = "sft") -> dict[str, Any]:
    """``sft`` with legacy names mapped to today's; unknown keys raise ConfigError with the closest valid key."""
    valid = sft_field_names()
    normalised: dict[str, Any] = {}
    for key, value in sft.items():
        if key in MOVED:
            raise ConfigError(f"{where}.{key} is an older name: use {MOVED[key]}")
        if key in RENAMED:
            logger.warning("%s.%s is an older name; using %s.%s", where, key, where, RENAMED[key])
            key = RENAMED[key]
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f"; did you mean {where}.{close[0]}?" if close else ""
            raise ConfigError(f"unknown key {where}.{key}{hint}")
        if key in normalised:
            raise ConfigError(f"{where}.{key} is set twice (once under an older name)")
        normalised[key] = value
    return normalised


def check_sft_combinations(sft: dict[str, Any], where: str = "sft") -> None:
    """Combinations that would fail (or silently misbehave) only after the model has loaded."""
    import torch

    if sft.get("bf16") and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        raise ConfigError(f"{where}.bf16 is true but this machine has no GPU with bf16; set {where}.bf16: false")
    if sft.get("fp16") and sft.get("bf16"):
        raise ConfigError(f"{where}.fp16 and {where}.bf16 are both true; choose one")
    if sft.get("load_best_model_at_end"):
        save, evaluate = sft.get("save_steps"), sft.get("eval_steps")
        if sft.get("save_strategy", "steps") == "steps" and evaluate and save and save % evaluate:
            raise ConfigError(
                f"{where}.load_best_model_at_end needs save_steps to be a multiple of eval_steps "
                f"(got save_steps {save}, eval_steps {evaluate})"
            )


def check_parameters(params: dict[str, Any]) -> None:
    """Check every parameter group a run uses; called by a Kedro hook before any node runs."""
    sft = normalise_sft(params.get("sft", {}))
    check_sft_combinations(sft)
    for variant in ("lora", "full_ft"):
        method = params.get(variant, {}).get("method", {})
        if "lora" in method:
            _check_lora(method["lora"], f"{variant}.method.lora")


def _check_lora(lora: dict[str, Any], where: str) -> None:
    from peft import LoraConfig

    valid = {field.name for field in dataclasses.fields(LoraConfig)}
    for key in lora:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f"; did you mean {where}.{close[0]}?" if close else ""
            raise ConfigError(f"unknown key {where}.{key}{hint}")
