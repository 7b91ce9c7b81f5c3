"""The seeds' four recipes: their values match the seed table, and each runs end to end on CPU, shrunk.

The CPU run swaps only the model path (a tiny model of the recipe's architecture), the accelerate file, batch
sizes and step counts (``vlm_pipeline.recipes.cpu_smoke_params``); everything else is the recipe's own.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess

import pytest
import yaml
from conftest import PROJECT_ROOT, run_kedro
from test_chain import assert_clean_model_folder
from test_config import load_params

from vlm_pipeline.config import validate_parameters
from vlm_pipeline.config.checks import is_placeholder
from vlm_pipeline.config.run import RunConfig
from vlm_pipeline.recipes import CPU_SMOKE_STEPS, RECIPES, cpu_smoke_params, load_parameters

# The issue's table of the seeds' values, per recipe: (parameter path, value).
SEED_TABLE = {
    "a": {
        "model.dtype": "bfloat16",  # seed 000: --torch_dtype bfloat16
        "model.attn_implementation": "flash_attention_2",  # seed 000: attn_implementation "flash"
        "sft.bf16": True,
        "sft.optim": "adamw_torch_fused",
        "sft.adam_beta1": 0.9,
        "sft.adam_beta2": 0.999,
        "sft.adam_epsilon": 1e-8,
        "sft.weight_decay": 0.01,
        "full_ft.method.learning_rate": 5e-5,
        "sft.lr_scheduler_type": "cosine",
        "sft.warmup_steps": 1000,
        "sft.per_device_train_batch_size": 4,
        "sft.gradient_accumulation_steps": 4,
        "sft.gradient_checkpointing": True,
        "sft.remove_unused_columns": False,
        "sft.eval_strategy": "steps",
        "sft.eval_steps": 500,
        "sft.save_steps": 2000,
        "sft.save_total_limit": 3,
    },
    "b": {
        "model.dtype": "float16",  # seed 001: torch_dtype=torch.float16
        "sft.fp16": True,
        "sft.bf16": False,
        "sft.per_device_train_batch_size": 2,
        "sft.gradient_accumulation_steps": 2,
        "sft.num_train_epochs": 3,
        "lora.method.lora.r": 8,
        "lora.method.lora.lora_alpha": 32,
        "lora.method.lora.lora_dropout": 0.05,
        "lora.method.lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "preprocessing.max_length": 512,
        "lora.method.quantization.load_in_8bit": True,
        "lora.method.lora.bias": "none",
    },
    "b-qlora": {
        "lora.method.quantization.load_in_4bit": True,
        "lora.method.quantization.bnb_4bit_quant_type": "nf4",
        "lora.method.quantization.bnb_4bit_use_double_quant": True,
        "lora.method.lora.r": 8,
        "lora.method.lora.lora_alpha": 32,
        "sft.per_device_train_batch_size": 2,
        "sft.gradient_accumulation_steps": 2,
    },
    "c": {
        "model.dtype": "bfloat16",  # seed 003: bf16, all tensors bfloat16
        "sft.accelerate_config": "conf/accelerate/fsdp.yaml",
        "sft.bf16": True,
        "sft.fp16": False,
        "sft.bf16_full_eval": True,
        "sft.optim": "adafactor",
        "sft.lr_scheduler_type": "constant",
        "sft.gradient_checkpointing_kwargs": {"use_reentrant": False},
        "sft.ddp_find_unused_parameters": False,
        "sft.eval_strategy": "steps",
        "sft.save_strategy": "steps",
        "sft.load_best_model_at_end": True,
        "sft.metric_for_best_model": "eval_loss",
        "sft.greater_is_better": False,
        "sft.dataloader_num_workers": 1,
    },
    "d": {
        "model.dtype": "bfloat16",  # seed 004: bf16 = True
        "sft.bf16": True,
        "sft.optim": "adamw_torch",
        "lora.method.learning_rate": 1e-4,
        "sft.lr_scheduler_type": "cosine",
        "sft.warmup_steps": 0.1,
        "sft.per_device_train_batch_size": 2,
        "sft.per_device_eval_batch_size": 2,
        "sft.logging_steps": 2,
        "sft.eval_strategy": "steps",
        "sft.eval_steps": 100,
        "sft.save_steps": 1000,
        "sft.num_train_epochs": 3,
        "preprocessing.max_length": 2048,
    },
}


def lookup(params, path: str):
    for key in path.split("."):
        params = getattr(params, key)
    return params


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_carries_the_seed_values(name):
    recipe = RECIPES[name]
    params = validate_parameters(load_params(recipe.env))
    for path, expected in SEED_TABLE[name].items():
        assert lookup(params, path) == expected, f"recipe ({name}) {recipe.env}: {path}"
    accelerate = yaml.safe_load((PROJECT_ROOT / params.sft.accelerate_config).read_text())
    if name == "a":
        assert accelerate["distributed_type"] == "DEEPSPEED" and accelerate["deepspeed_config"]["zero_stage"] == 3
        assert accelerate["num_processes"] == 8 and accelerate["mixed_precision"] == "bf16"
        effective = params.sft.per_device_train_batch_size * params.sft.gradient_accumulation_steps * 8
        assert effective == 128
    if name == "c":  # the seed's fsdp_config, in accelerate's keys
        fsdp = accelerate["fsdp_config"]
        assert accelerate["distributed_type"] == "FSDP" and accelerate["mixed_precision"] == "bf16"
        assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_backward_prefetch"] == "BACKWARD_PRE"
        assert fsdp["fsdp_sync_module_states"] is True
        assert fsdp["fsdp_use_orig_params"] is False and fsdp["fsdp_offload_params"] is False


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_prints_both_paths_as_placeholders_to_replace(name, capsys, monkeypatch):
    """The printed command names base_model and raw_data as the recipe's <...> placeholders, as the Slurm script
    requires BASE_MODEL and RAW_DATA: pasted unchanged it stops in the pre-run checks (test_errors), never trains on
    the demo's data. The CPU smoke run gives both, the demo's data of the recipe's architecture."""
    from vlm_pipeline.commands import main

    monkeypatch.chdir(PROJECT_ROOT)
    with pytest.raises(SystemExit) as exit_code:
        main(["recipe", name])
    assert exit_code.value.code == 0
    (command,) = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if "kedro run" in line]
    assert command[:6] == ["kedro", "run", "--pipelines", RECIPES[name].pipeline, "--env", RECIPES[name].env]
    paths = dict(item.split("=", 1) for item in command[command.index("--params") + 1].split(","))
    assert set(paths) == {"base_model", "raw_data"} and all(is_placeholder(value) for value in paths.values())
    smoke = cpu_smoke_params(RECIPES[name], "data/00_base_models/tiny")
    assert (PROJECT_ROOT / smoke["raw_data"] / "train.jsonl").is_file() and not is_placeholder(smoke["raw_data"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_end_to_end_on_cpu_with_a_tiny_model(name, project, tiny_models):
    recipe = RECIPES[name]
    runtime = cpu_smoke_params(recipe, str(tiny_models[recipe.architecture]))
    # The serving check is the chain tests' claim (every family, lora and full FT): a server start
    # here would add 7 s to each recipe and test nothing of it.
    runtime["evaluation"] = {**runtime["evaluation"], "serving_check": False}
    run_kedro(project, recipe.pipeline, env=recipe.env, short=False, **runtime)
    variant_dir = project / "data/06_models" / recipe.pipeline
    history = json.loads((variant_dir / "training_history.json").read_text())
    steps = [entry["step"] for entry in history if "loss" in entry]
    assert max(steps) == CPU_SMOKE_STEPS
    rates = [entry["learning_rate"] for entry in history if "loss" in entry]
    params = validate_parameters(load_params(recipe.env))
    warmup = params.sft.warmup_steps
    warmup = warmup if warmup >= 1 else math.ceil(warmup * CPU_SMOKE_STEPS)
    if params.sft.lr_scheduler_type == "constant":
        assert len(set(rates)) == 1
    elif warmup >= CPU_SMOKE_STEPS:  # recipe (a): 1000 warm-up steps, so 4 steps only climb
        assert rates == sorted(rates) and rates[-1] > rates[0]
    else:
        assert rates[-1] < max(rates)  # warm-up done, the schedule decays
    if params.sft.eval_strategy == "steps":
        assert any("eval_loss" in entry for entry in history)
    if params.sft.load_best_model_at_end:
        checkpoint = RunConfig.read(variant_dir / "run_config.json").checkpoint_dir / f"checkpoint-{CPU_SMOKE_STEPS}"
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["best_model_checkpoint"] and state["best_metric"] is not None
    metrics = json.loads((project / "data/08_reporting" / recipe.pipeline / "detailed_metrics.json").read_text())
    assert {"base", "tuned"} <= set(metrics)
    run_info = json.loads((variant_dir / "trained/run_info.json").read_text())
    # The preflight plan said what the Trainer did: its steps, and the checkpoint folders left at the end.
    plan = json.loads((project / "data/08_reporting" / recipe.pipeline / "training_plan.json").read_text())
    assert plan["steps"]["total_steps"] == run_info["global_step"] == CPU_SMOKE_STEPS
    checkpoint_dir = RunConfig.read(variant_dir / "run_config.json").checkpoint_dir
    left = {path.name for path in checkpoint_dir.glob("checkpoint-*")}
    kept = set(plan["steps"]["checkpoints_kept"]["names"])
    assert kept <= left and len(left - kept) <= int(plan["steps"]["checkpoints_kept"]["plus_best"]), (left, kept)
    quantization = params.lora.method.quantization if recipe.pipeline == "lora" else None
    if quantization is not None:  # (b) 8-bit, (b-qlora) 4-bit: trained on bitsandbytes layers ...
        assert set(run_info["quantized_layers"]) == {"Linear8bitLt" if quantization.load_in_8bit else "Linear4bit"}
    assert_clean_model_folder(project / "data/06_models" / recipe.pipeline / "merged")
    if recipe.pipeline == "lora":  # ... and merged into the unquantized base, verified in float32
        check = json.loads((project / "data/08_reporting/lora/merge_check.json").read_text())
        assert check["passed"] and check["dtype"] == "float32" and check["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_nodes_prints_a_slurm_script_bash_accepts_with_a_valid_per_node_command(name, capsys, tmp_path):
    from accelerate.commands.launch import launch_command_parser

    from vlm_pipeline.commands import main

    with pytest.raises(SystemExit) as exit_code:
        main(["recipe", name, "--nodes", "2"])
    assert exit_code.value.code == 0
    script = capsys.readouterr().out
    (tmp_path / "job.sh").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sh")], check=True)
    assert "#SBATCH --nodes=2" in script and "srun " in script
    # What srun runs on node 1 of a job whose first node is gpu-a: accelerate's own parser takes it.
    (per_node,) = [line for line in script.splitlines() if line.startswith("srun ")]
    command = per_node.split("bash -c ", 1)[1].strip("'")
    for variable, value in {
        '"$SLURM_NNODES"': "2",
        '"$((SLURM_NNODES * ': "",
        '"$SLURM_NODEID"': "1",
        '"$MAIN_ADDR"': "gpu-a",
    }.items():
        command = command.replace(variable, value)
    command = re.sub(r"(\d+)\)\)\"", lambda m: str(2 * int(m.group(1))), command)
    args = launch_command_parser().parse_args(shlex.split(command)[3:])
    config = load_parameters(RECIPES[name].env)["sft"]["accelerate_config"]
    assert (args.config_file, args.machine_rank, args.num_machines, args.main_process_ip) == (config, 1, 2, "gpu-a")
    assert args.training_script == "vlm_pipeline.training.trainer" and args.module
    assert args.training_script_args == ["--config", f"data/06_models/{RECIPES[name].pipeline}/run_config.json"]
