"""Node functions for training. The trainer itself is ``vlm_pipeline.training.trainer``.

The plan (it reads the model's shapes), the checkpoint lookup and the curve logger import torch or transformers:
they are imported in the functions that use them, so loading the pipeline registry does not pay for them."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from datasets import Dataset

from vlm_pipeline.atomic import link_tree
from vlm_pipeline.config.run import RunConfig, RunContext
from vlm_pipeline.config.schema import MethodParams, PlanParams, PreprocessingParams, SFTParams
from vlm_pipeline.reporting.tables import format_plan
from vlm_pipeline.tracking import active_run_target
from vlm_pipeline.training.launcher import launch, launch_command, resolve_run_config

logger = logging.getLogger(__name__)


def plan_training(
    train_data: Dataset,
    context: RunContext,
    preprocessing: PreprocessingParams,
    sft: SFTParams,
    method: MethodParams,
    plan: PlanParams,
) -> dict:
    """The preflight plan (steps, checkpoints, memory per GPU) from config.json alone; stops an over-budget run."""
    from vlm_pipeline.planning.plan import build_plan, check_fits, training_data

    result = build_plan(
        model_dir=context.base_model,
        sft=sft,
        method=method,
        images=preprocessing.images.model_dump(),
        **training_data(train_data),
        max_length=preprocessing.max_length,
        gpu_memory_gb=plan.gpu_memory_gb,
        trust_remote_code=context.model.trust_remote_code,
        load_dtype=context.model.dtype,
    )
    logger.info("Training plan: %s", format_plan(result, compact=True))
    check_fits(result)
    return result


def write_run_config(
    context: RunContext,
    train_data: Path,
    validation_data: Path,
    preprocessing: PreprocessingParams,
    sft: SFTParams,
    method: MethodParams,
    checkpoints: Path,
    trained_model_staging: Path,
) -> dict:
    """The trainer's whole input (``RunConfig``), for the catalog to save before the launch reads it."""
    config = resolve_run_config(
        context=context,
        train_dataset=train_data,
        eval_dataset=validation_data,
        image_bounds=preprocessing.images,
        video_sampling=preprocessing.videos,
        chat_template=preprocessing.chat_template,
        sft=sft,
        method=method,
        checkpoint_root=checkpoints,
        final_dir=trained_model_staging,
    )
    return config.model_dump(mode="json")


def train_model(run_config: Path, training_plan: dict) -> tuple[Path, list, dict]:
    """Launch the trainer on the saved run config; return the staged trained model (or adapter), its log history
    and the trainable-parameter table (per component). Warns if the run took other steps than the plan said."""
    from vlm_pipeline.training.checkpoints import finished_run
    from vlm_pipeline.training.live_metrics import log_history

    config = RunConfig.read(run_config)
    final_dir = config.final_dir
    finished = finished_run(config.checkpoint_dir)
    tracking = active_run_target()
    if finished is not None:  # e.g. trained by a multi-node job (docs/distributed.md): no launch, no rendezvous
        logger.info("this run config already finished training; using %s", finished)
        link_tree(finished, final_dir)
    else:
        launch_following_curves(config, run_config, tracking)
    history = json.loads((final_dir / "training_history.json").read_text())
    if finished is not None and tracking:  # nothing followed: the saved curves, once
        log_history(*tracking, history)
    trainable = json.loads((final_dir / "trainable_parameters.json").read_text())
    ran = json.loads((final_dir / "run_info.json").read_text())["global_step"]
    if ran != training_plan["steps"]["total_steps"]:
        logger.warning("training took %d optimizer steps; the plan said %d", ran, training_plan["steps"]["total_steps"])
    return final_dir, history, trainable


def launch_following_curves(config: RunConfig, run_config: Path, tracking: tuple[str, str] | None) -> None:
    """Launch the trainer; with an MLflow run, log the curves it writes into that run while it trains."""
    from vlm_pipeline.training.live_metrics import FollowCurves

    if tracking is None:
        launch(launch_command(config.sft.accelerate_config, run_config))
        return
    with tempfile.TemporaryDirectory(prefix="vlm-pipeline-curves-") as folder:
        curves = Path(folder) / "curves.jsonl"
        with FollowCurves(curves, *tracking):
            launch(launch_command(config.sft.accelerate_config, run_config, curves))
