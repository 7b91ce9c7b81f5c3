"""Node functions for training. The trainer itself is ``vlm_pipeline.training.trainer``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from datasets import Dataset

from vlm_pipeline.atomic import staging_dir_for
from vlm_pipeline.config.schema import MethodParams, PlanParams, SFTParams, parse_section
from vlm_pipeline.planning.plan import build_plan, check_fits, format_plan, training_data
from vlm_pipeline.training.launcher import launch, launch_command, resolve_run_config, write_run_config

logger = logging.getLogger(__name__)


def plan_training(
    train_data: Dataset,
    base_model: Path,
    preprocessing: dict,
    model: dict,
    sft: dict,
    method: dict,
    plan: dict,
    trust_remote_code: bool = False,
) -> dict:
    """The preflight plan (steps, checkpoints, memory per GPU) from config.json alone; stops an over-budget run."""
    result = build_plan(
        model_dir=base_model,
        sft=parse_section(SFTParams, sft, "sft"),
        method=parse_section(MethodParams, method, "method"),
        images=preprocessing["images"],
        **training_data(train_data),
        max_length=preprocessing["max_length"],
        gpu_memory_gb=parse_section(PlanParams, plan, "plan").gpu_memory_gb,
        trust_remote_code=trust_remote_code,
        load_dtype=model["dtype"],
    )
    logger.info("Training plan\n%s", format_plan(result))
    check_fits(result)
    return result


def train_model(
    train_data: Path,
    validation_data: Path,
    base_model: Path,
    raw_data: str,
    preprocessing: dict,
    model: dict,
    sft: dict,
    method: dict,
    training_plan: dict,
    trust_remote_code: bool = False,
) -> tuple[Path, list, dict]:
    """Launch the trainer; return the staged trained model (or adapter), its log history and the
    trainable-parameter table (per component). Warns if the run took other steps than the plan said."""
    output_dir = Path(method["output_dir"])
    final_dir = staging_dir_for(output_dir / "trained")
    config = resolve_run_config(
        base_model=base_model,
        train_dataset=train_data,
        eval_dataset=validation_data,
        image_root=Path(raw_data),
        image_bounds=preprocessing["images"],
        chat_template=preprocessing["chat_template"],
        model=model,
        sft=sft,
        method=method,
        final_dir=final_dir,
        trust_remote_code=trust_remote_code,
    )
    config_path = write_run_config(config, output_dir / "run_config.json")
    launch(launch_command(sft["accelerate_config"], config_path))
    history = json.loads((final_dir / "training_history.json").read_text())
    trainable = json.loads((final_dir / "trainable_parameters.json").read_text())
    ran = json.loads((final_dir / "run_info.json").read_text())["global_step"]
    if ran != training_plan["steps"]["total_steps"]:
        logger.warning("training took %d optimizer steps; the plan said %d", ran, training_plan["steps"]["total_steps"])
    return final_dir, history, trainable


def training_curves(history: list[dict]) -> dict[str, list[dict]]:
    """The log history as MLflow metric series: {"train.loss": [{"step": s, "value": v}, ...], ...}."""
    curves: dict[str, list[dict]] = {}
    for entry in history:
        step = entry.get("step", 0)
        for key in ("loss", "learning_rate", "grad_norm", "train_loss", "mean_token_accuracy"):
            if isinstance(entry.get(key), (int, float)):
                curves.setdefault(f"train.{key}", []).append({"step": step, "value": float(entry[key])})
    return curves
