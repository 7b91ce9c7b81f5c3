"""The real trainer under `accelerate launch` with 2 CPU processes (gloo): DDP, FSDP and DeepSpeed ZeRO-3.

Each run must use the engine its accelerate file asks for (world size 2 and the engine's own wrapper, recorded
by the trainer in run_info.json, so a silent fallback to DDP or one process fails), take as many optimizer
steps as one process with the same global batch, lower the loss, and save a complete model.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from conftest import PROJECT_ROOT, copy_project, launched_run_config, run_data_stages

from vlm_pipeline.architectures import load_model
from vlm_pipeline.model_files import check_full_model
from vlm_pipeline.training.launcher import launch_command

pytestmark = pytest.mark.slow  # Kedro sessions, subprocesses or training runs: `make test` only

GLOBAL_BATCH = 4
ENGINES = {
    "cpu_ddp": {"distributed_type": "MULTI_CPU", "engine": "DistributedDataParallel", "dtensor_parameters": False},
    "cpu_fsdp": {"distributed_type": "FSDP", "engine": "FSDPLlamaForCausalLM", "dtensor_parameters": True},
    "cpu_deepspeed_zero3": {"distributed_type": "DEEPSPEED", "engine": "DeepSpeedEngine", "dtensor_parameters": False},
}


@pytest.fixture(scope="module")
def text_data(tmp_path_factory, tiny_models) -> Path:
    """The alpaca sample, validated and tokenised for the tiny Llama by the project's own data stages."""
    project = copy_project(tmp_path_factory.mktemp("distributed") / "project")
    return run_data_stages(project, "tiny_llama", base_model=str(tiny_models["llama"])) / "train"


def train(
    out: Path, accelerate_config: str, per_device: int, base_model: Path, data: Path, method: dict | None = None
) -> Path:
    image_root = PROJECT_ROOT / "data/01_raw/alpaca_glossary"
    config = launched_run_config(out, base_model, data, image_root, accelerate_config, per_device, method)
    command = launch_command(str(PROJECT_ROOT / accelerate_config), config)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("vlm-pipeline: trainable parameters") == 1  # printed by the main process only
    return out / "final"


@pytest.fixture(scope="module")
def single_process_steps(tmp_path_factory, tiny_models, text_data) -> int:
    final = train(
        tmp_path_factory.mktemp("single"),
        "conf/accelerate/cpu_single_process.yaml",
        GLOBAL_BATCH,
        tiny_models["llama"],
        text_data,
    )
    info = json.loads((final / "run_info.json").read_text())
    assert info["world_size"] == 1
    return info["global_step"]


# Each engine's accelerate file has its own fixed port; under pytest-xdist this group runs on one worker, so
# two launches never race for one port.
@pytest.mark.xdist_group("torch_distributed_ports")
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_process_engine_on_cpu(engine, tmp_path, tiny_models, text_data, single_process_steps):
    # The language model's own rate over the method's: the engine's optimizer must train with it.
    method = {"learning_rate": 1e-3, "learning_rates": {"language_model": 5e-4}}
    config = f"conf/accelerate/{engine}.yaml"
    final = train(tmp_path, config, GLOBAL_BATCH // 2, tiny_models["llama"], text_data, method)
    info = json.loads((final / "run_info.json").read_text())
    assert info["world_size"] == 2
    assert {key: info[key] for key in ENGINES[engine]} == ENGINES[engine]
    assert info["global_step"] == single_process_steps > 1
    history = [entry for entry in json.loads((final / "training_history.json").read_text()) if "loss" in entry]
    losses = [entry["loss"] for entry in history]
    assert len(losses) == single_process_steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # the loss goes down
    # The optimizer's groups, read back from the engine: every one the language model's, at its configured rate.
    assert {(group["component"], group["initial_lr"]) for group in info["optimizer_groups"]} == {
        ("language_model", 5e-4)
    }
    rates = [entry["learning_rate/language_model"] for entry in history]
    assert rates == [entry["learning_rate"] for entry in history] and max(rates) == pytest.approx(5e-4)
    if engine == "cpu_deepspeed_zero3":  # its engine steps inside backward: no gradient left to measure
        assert not any("grad_norm/language_model" in entry for entry in history)
    else:  # the language model holds every trainable parameter: its norm is the whole (pre-clip) norm
        norms = [(entry["grad_norm/language_model"], entry["grad_norm"]) for entry in history]
        assert all(norm == pytest.approx(total, rel=1e-4) for norm, total in norms)
    # A complete model (ZeRO-3 and FSDP gather their shards): the base's tensors, each in its shape; loadable on its
    # own (which fails on a missing tensor rather than filling it at random); trained, so not the base.
    assert check_full_model(final, tiny_models["llama"])["matches_base"]
    trained, base = load_model(final), load_model(tiny_models["llama"])
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters(), strict=True))
    written = {path.name for path in final.iterdir()}
    assert {"model.safetensors", "run_info.json", "training_history.json", "trainable_parameters.json"} <= written


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "conf/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_files_are_valid_accelerate_configs(path):
    config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys fail here
    assert config.num_processes >= 1 and config.distributed_type is not None
