"""The seeds' four recipes: which conf environment and pipeline each is, and its CPU smoke-test override.

A recipe is a Kedro conf environment (``conf/<env>/``) carrying the seed's values; its ``base_model`` and
``raw_data`` are ``<...>`` placeholders, the user's to give (a run stops in its pre-run checks until they are).
``cpu_smoke_params`` is the override that runs it end to end on a laptop: it swaps only the two paths (a tiny
model of the same architecture and the demo data of its tiny environment), the accelerate file (one CPU process),
the attention kernel (sdpa), batch sizes and step counts. Precision, optimizer, schedule, LoRA and evaluation
settings stay the recipe's own.
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
    demo_env: str
    """The conf environment of the project's tiny demo of the same architecture: its ``raw_data`` is what the CPU
    smoke run trains on."""


MLLAMA_11B = "conf/model_configs/llama-3.2-11b-vision-instruct"
RECIPES: dict[str, Recipe] = {
    "a": Recipe(
        "llama_vision_full_ft",
        "full_ft",
        "mllama",
        "Llama-3.2-11B-Vision full FT, 8×80 GB, DeepSpeed ZeRO-3",
        MLLAMA_11B,
        "tiny_mllama",
    ),
    "b": Recipe(
        "llama_vision_lora",
        "lora",
        "mllama",
        "Llama-3.2-11B-Vision LoRA on an 8-bit base, one A100",
        MLLAMA_11B,
        "tiny_mllama",
    ),
    "c": Recipe(
        "qwen_vl_fsdp",
        "full_ft",
        "qwen2_5_vl",
        "Qwen2.5-VL full FT, FSDP, bf16, Adafactor",
        "conf/model_configs/qwen2.5-vl-7b-instruct",
        "base",
    ),
    "d": Recipe(
        "llama_text_lora",
        "lora",
        "llama",
        "Llama-3.1-8B LoRA from alpaca JSONL",
        "conf/model_configs/llama-3.1-8b-instruct",
        "tiny_llama",
    ),
    "b-qlora": Recipe(
        "llama_vision_qlora", "lora", "mllama", "recipe (b) over a 4-bit NF4 base (QLoRA)", MLLAMA_11B, "tiny_mllama"
    ),
}

CPU_SMOKE_STEPS = 4


def cpu_smoke_params(recipe: Recipe, tiny_model: str) -> dict[str, Any]:
    """Runtime parameters that shrink ``recipe`` to a few steps of one CPU process on ``tiny_model`` and the demo
    data of its architecture."""
    return {
        "base_model": tiny_model,
        "raw_data": load_parameters(recipe.demo_env)["raw_data"],
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


def run_command(recipe: Recipe) -> str:
    """The ``kedro run`` line of ``recipe``, with the two paths as its environment leaves them: ``<...>``
    placeholders to replace (pasted as they are, the run stops in its pre-run checks, naming each)."""
    import shlex

    params = load_parameters(recipe.env)
    paths = as_cli_params({key: params[key] for key in ("base_model", "raw_data")})
    return f"kedro run --pipelines {recipe.pipeline} --env {recipe.env} --params {shlex.quote(paths)}"


def load_parameters(env: str, runtime_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parameters as ``kedro run --env ENV --params ...`` merges them (conf/base, then the environment)."""
    return load_config(env, "parameters", runtime_params)


def load_config(env: str, key: str, runtime_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """One kind of configuration (``parameters``, ``catalog``) as ``kedro run --env ENV --params ...`` reads it."""
    from kedro.config import OmegaConfigLoader

    from vlm_pipeline import settings

    args = {k: v for k, v in settings.CONFIG_LOADER_ARGS.items() if k not in ("base_env", "default_run_env")}
    loader = OmegaConfigLoader(
        "conf", base_env="base", default_run_env=env, runtime_params=runtime_params or {}, **args
    )
    return loader[key]


MAIN_PORT = 29500


def node_command(recipe: Recipe, accelerate_config: str, gpus_per_node: int) -> str:
    """What every node of a Slurm job runs: the trainer under ``accelerate launch``, its machine rank from
    ``SLURM_NODEID`` and the first node of the job as the rendezvous address (``$MAIN_ADDR``)."""
    import shlex

    from vlm_pipeline.training.launcher import launch_command

    command = launch_command(
        accelerate_config,
        f"data/06_models/{recipe.pipeline}/run_config.json",
        num_machines="$SLURM_NNODES",
        num_processes=f"$((SLURM_NNODES * {gpus_per_node}))",
        machine_rank="$SLURM_NODEID",
        main_process_ip="$MAIN_ADDR",
        main_process_port=MAIN_PORT,
    )
    command[0] = "python"  # the job's environment (.venv activated), not this machine's interpreter path
    return " ".join(f'"{part}"' if part.startswith("$") else shlex.quote(part) for part in command)


def slurm_script(name: str, nodes: int) -> str:
    """A Slurm batch script running recipe ``name`` on ``nodes`` machines: the data stages and the run config once,
    the trainer on every node (``srun``), then the adapter and evaluation stages once."""
    import yaml

    recipe = RECIPES[name]
    accelerate_config = load_parameters(recipe.env)["sft"]["accelerate_config"]
    accelerate = yaml.safe_load(open(accelerate_config, encoding="utf-8"))
    gpus_per_node = int(accelerate.get("num_processes", 1)) // max(int(accelerate.get("num_machines", 1)), 1)
    kedro = f"kedro run --pipelines {recipe.pipeline} --env {recipe.env}"
    return f"""#!/bin/bash
# Recipe ({name}): {recipe.summary}, on {nodes} nodes. Written by `vlm-pipeline recipe {name} --nodes {nodes}`.
# Submit from the project folder on storage every node sees (docs/distributed.md says which paths must be shared):
#   BASE_MODEL=/models/checkpoint RAW_DATA=/data/set sbatch this_script.sh
#SBATCH --job-name=vlm-pipeline-{name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --exclusive
set -euo pipefail
source .venv/bin/activate
: "${{BASE_MODEL:?set BASE_MODEL to the checkpoint folder}}" "${{RAW_DATA:?set RAW_DATA to the data folder}}"
PARAMS="base_model=$BASE_MODEL,raw_data=$RAW_DATA"
export MAIN_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"

# 1. Once: validation, preprocessing, the plan and the trainer's run config.
{kedro} --params "$PARAMS" --to-nodes {recipe.pipeline}.training.write_run_config

# 2. Every node: the trainer, machine rank from SLURM_NODEID. Slurm's SIGTERM (scancel, time limit) reaches
#    it through srun: each node saves a checkpoint of the same step and stops; resubmitting resumes.
srun --kill-on-bad-exit=1 bash -c '{node_command(recipe, accelerate_config, gpus_per_node)}'

# 3. Once: the finished training is picked up (not run again), then the adapter and evaluation stages.
{kedro} --params "$PARAMS" --from-nodes {recipe.pipeline}.training.train_model
"""
