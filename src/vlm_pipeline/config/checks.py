"""Checks before any node runs: the schema, then what it cannot see alone (this machine, the accelerate file).

Called by a Kedro hook (``vlm_pipeline.hooks``), so ``kedro run`` and ``dvc repro`` stop in seconds on a typo,
a GPU recipe on a machine without GPUs, or an accelerate file that disagrees with the parameters.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import yaml

from vlm_pipeline.config.schema import ATTENTION_PACKAGES, ConfigError, Parameters, validate_parameters

logger = logging.getLogger(__name__)

BITSANDBYTES_OPTIMIZERS = {
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "lion_8bit",
    "paged_lion_8bit",
}


def check_parameters(params: dict[str, Any], project_root: Path | None = None) -> Parameters:
    """Validate every parameter group, then check them against this machine; return the typed parameters."""
    parsed = validate_parameters(params)
    check_machine(parsed, project_root or Path.cwd())
    if parsed.model.trust_remote_code:
        logger.warning(
            "model.trust_remote_code is true: Python files inside %s will run. Use it only for checkpoints you trust.",
            parsed.base_model,
        )
    return parsed


def check_machine(params: Parameters, project_root: Path) -> None:
    """Settings this machine cannot run: they would otherwise fail only after the model has loaded."""
    import torch

    sft = params.sft
    accelerate_file = project_root / sft.accelerate_config
    if not accelerate_file.is_file():
        raise ConfigError(f"sft.accelerate_config: {accelerate_file} does not exist (see conf/accelerate/)")
    accelerate = yaml.safe_load(accelerate_file.read_text()) or {}
    on_cpu = bool(accelerate.get("use_cpu"))
    gpus = torch.cuda.device_count()
    if not on_cpu:
        wanted = int(accelerate.get("num_processes", 1)) // max(int(accelerate.get("num_machines", 1)), 1)
        if gpus < max(wanted, 1):
            raise ConfigError(
                f"{sft.accelerate_config} runs {max(wanted, 1)} process(es) per machine on GPUs, but this machine "
                f"has {gpus} GPU(s): use a conf/accelerate/cpu_*.yaml file here, or run on the GPU machine"
            )
    if sft.bf16 and not on_cpu and not torch.cuda.is_bf16_supported():
        raise ConfigError("sft.bf16 is true but this machine's GPU has no bf16 (pre-Ampere); set sft.fp16 instead")
    _check_accelerate_agrees(accelerate, params, sft.accelerate_config)
    quantized = [
        name
        for name, variant in (("lora", params.lora), ("full_ft", params.full_ft))
        if variant and variant.method.quantization and variant.method.quantization.enabled
    ]
    attention = params.model.attn_implementation
    package = ATTENTION_PACKAGES.get(attention)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"model.attn_implementation {attention} needs the {package} package, which is not installed in this "
            "environment: install it on the GPU machine, or use sdpa"
        )
    if (quantized or sft.optim in BITSANDBYTES_OPTIMIZERS) and importlib.util.find_spec("bitsandbytes") is None:
        needs = f"{quantized[0]}.method.quantization" if quantized else f"sft.optim {sft.optim}"
        raise ConfigError(f"{needs} needs bitsandbytes, which is not installed in this environment")


def _check_accelerate_agrees(accelerate: dict[str, Any], params: Parameters, name: str) -> None:
    """DeepSpeed reads its own accumulation and precision: a mismatch fails late inside DeepSpeed or silently."""
    sft = params.sft
    deepspeed = accelerate.get("deepspeed_config") or {}
    accumulation = deepspeed.get("gradient_accumulation_steps")
    if accumulation not in (None, "auto") and int(accumulation) != sft.gradient_accumulation_steps:
        raise ConfigError(
            f"{name} sets gradient_accumulation_steps {accumulation} but sft.gradient_accumulation_steps is "
            f"{sft.gradient_accumulation_steps}: make them equal (or set 'auto' in the accelerate file)"
        )
    precision = accelerate.get("mixed_precision", "no")
    wanted = "bf16" if sft.bf16 else "fp16" if sft.fp16 else "no"
    if precision not in ("no", wanted):
        raise ConfigError(f"{name} sets mixed_precision {precision} but sft asks for {wanted}: make them agree")
