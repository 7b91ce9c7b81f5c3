"""Two "machines" on one host: two launches with num_machines 2 and machine_rank 0 and 1, rendezvous on
127.0.0.1, one process each, gloo. Under DDP and ZeRO-3 through `accelerate launch`, and under DDP through
`torchrun --nnodes 2 --node_rank R` (what a Slurm job runs on each node). A killed peer stops the other node
with an error naming it, and a rerun of both resumes from the last complete checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import PROJECT_ROOT, copy_project, launched_run_config, run_data_stages
from datasets import load_from_disk

from vlm_pipeline.architectures import load_model
from vlm_pipeline.config.run import RunConfig
from vlm_pipeline.model_files import check_full_model
from vlm_pipeline.training.launcher import launch_command

# Subprocesses and training runs (`make test` only). Under pytest-xdist, multi-process launches run one at a
# time in one worker (with tests/test_distributed.py and test_mixed_ranks.py): two ZeRO-3 jobs side by side on
# two cores have aborted (SIGABRT) at shutdown.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torch_distributed_ports")]

GLOBAL_BATCH = 4
TIMEOUT = 300  # a hang becomes a failure


@pytest.fixture(scope="module")
def text_data(tmp_path_factory, tiny_models) -> Path:
    project = copy_project(tmp_path_factory.mktemp("multinode") / "project")
    return run_data_stages(project, "tiny_llama", base_model=str(tiny_models["llama"])) / "train"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_config(out: Path, base_model: Path, data: Path, accelerate_config: str, **sft) -> Path:
    image_root = PROJECT_ROOT / "data/01_raw/alpaca_glossary"
    return launched_run_config(out, base_model, data, image_root, accelerate_config, GLOBAL_BATCH // 2, **sft)


def start_nodes(commands: list[list[str]], logs: Path) -> list[subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            command,
            cwd=logs,  # accelerate's multi-node DeepSpeed launcher writes .deepspeed_env into the working folder
            stdout=(logs / f"node{rank}.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, like a process on another machine
        )
        for rank, command in enumerate(commands)
    ]


def wait_all(nodes: list[subprocess.Popen], logs: Path) -> list[int]:
    try:
        return [node.wait(timeout=TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
        for rank in range(len(nodes)):
            print(f"--- node {rank}\n" + (logs / f"node{rank}.log").read_text()[-3000:])


def accelerate_nodes(accelerate_config: str, config: Path, port: int) -> list[list[str]]:
    return [
        launch_command(PROJECT_ROOT / accelerate_config, config, machine_rank=rank, main_process_port=port)
        for rank in (0, 1)
    ]


def torchrun_nodes(config: Path, port: int) -> list[list[str]]:
    return [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank)]
        + ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
        + ["-m", "vlm_pipeline.training.trainer", "--config", str(config)]
        for rank in (0, 1)
    ]


def assert_one_run_on_two_nodes(config_path: Path, logs: Path, data: Path, engine: str) -> None:
    config = RunConfig.read(config_path)
    info = json.loads((config.final_dir / "run_info.json").read_text())
    assert (info["world_size"], info["nodes"], info["engine"]) == (2, 2, engine)
    assert info["global_step"] == math.ceil(len(load_from_disk(str(data))) / GLOBAL_BATCH)  # one process's count
    # Written once, by the global main process: only node 0 reports, and the finished run is kept once.
    reports = [(logs / f"node{rank}.log").read_text().count("vlm-pipeline: trainable parameters") for rank in (0, 1)]
    assert reports == [1, 0]
    assert (config.checkpoint_dir / "final/model.safetensors").is_file()
    losses = [e["loss"] for e in json.loads((config.final_dir / "training_history.json").read_text()) if "loss" in e]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    # A complete model (ZeRO-3 gathers its shards): the base's tensors, each in its shape; and loadable on its own,
    # which fails on a missing tensor rather than filling it at random.
    assert check_full_model(config.final_dir, config.base_model)["matches_base"]
    load_model(config.final_dir)


@pytest.mark.parametrize(
    ("accelerate_config", "engine"),
    [
        ("conf/accelerate/cpu_ddp_2nodes.yaml", "DistributedDataParallel"),
        ("conf/accelerate/cpu_deepspeed_zero3_2nodes.yaml", "DeepSpeedEngine"),
    ],
)
def test_two_nodes_through_accelerate_launch(accelerate_config, engine, tmp_path, tiny_models, text_data):
    config = run_config(tmp_path / "run", tiny_models["llama"], text_data, accelerate_config)
    nodes = start_nodes(accelerate_nodes(accelerate_config, config, free_port()), tmp_path / "logs")
    assert wait_all(nodes, tmp_path / "logs") == [0, 0]
    assert_one_run_on_two_nodes(config, tmp_path / "logs", text_data, engine)


def test_two_nodes_through_torchrun(tmp_path, tiny_models, text_data):
    config = run_config(tmp_path / "run", tiny_models["llama"], text_data, "conf/accelerate/cpu_ddp_2nodes.yaml")
    nodes = start_nodes(torchrun_nodes(config, free_port()), tmp_path / "logs")
    assert wait_all(nodes, tmp_path / "logs") == [0, 0]
    assert_one_run_on_two_nodes(config, tmp_path / "logs", text_data, "DistributedDataParallel")


def test_a_killed_node_stops_the_other_with_its_name_and_both_resume(tmp_path, tiny_models, text_data):
    accelerate_config = "conf/accelerate/cpu_ddp_2nodes.yaml"
    # Long enough to be killed mid-run (the tiny model takes about 14 steps a second).
    config = run_config(
        tmp_path / "run",
        tiny_models["llama"],
        text_data,
        accelerate_config,
        max_steps=400,
        save_steps=4,
        ddp_timeout=60,
    )
    checkpoints = RunConfig.read(config).checkpoint_dir
    port = free_port()
    logs = tmp_path / "killed"
    nodes = start_nodes(accelerate_nodes(accelerate_config, config, port), logs)
    deadline = time.monotonic() + TIMEOUT
    while not list(checkpoints.glob("checkpoint-8/trainer_state.json")):
        assert all(node.poll() is None for node in nodes), [node.poll() for node in nodes]
        assert time.monotonic() < deadline, "no checkpoint-8"
        time.sleep(0.1)
    # Machine 1 is gone: its launcher and the worker torchrun started in a session of its own.
    machine_1 = psutil.Process(nodes[1].pid)
    for process in [*machine_1.children(recursive=True), machine_1]:
        process.kill()
    started = time.monotonic()
    codes = wait_all(nodes[:1], logs)
    assert codes[0] != 0 and time.monotonic() - started < 120
    # gloo names the lost peer: "Connection closed by peer [127.0.0.1]:PORT", or "Read error [127.0.0.1]:PORT:
    # Connection reset by peer", depending on where node 0 was when the socket closed.
    errors = [line for line in (logs / "node0.log").read_text().splitlines() if "by peer" in line]
    assert errors and all("[127.0.0.1]:" in line for line in errors), errors

    # Where both machines must resume: the newest checkpoint whose trainer_state.json (written last) is whole.
    def whole(state: Path) -> bool:
        try:
            return bool(json.loads(state.read_text()))
        except ValueError:
            return False

    saved = [state.parent for state in checkpoints.glob("checkpoint-*/trainer_state.json") if whole(state)]
    newest = max(saved, key=lambda path: int(path.name.removeprefix("checkpoint-")))

    logs = tmp_path / "rerun"
    nodes = start_nodes(accelerate_nodes(accelerate_config, config, free_port()), logs)
    assert wait_all(nodes, logs) == [0, 0]
    # Each machine's log names the checkpoint it resumed from: both the same, the newest complete one.
    resumed = [re.findall(r"resuming from (\S+) ", (logs / f"node{rank}.log").read_text()) for rank in (0, 1)]
    assert resumed == [[str(newest)], [str(newest)]], resumed
