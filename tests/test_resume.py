"""A training run killed with SIGKILL resumes from its newest complete checkpoint when rerun; one stopped with
SIGTERM saves a checkpoint first, leaves nothing running, and the rerun resumes from it.

The first `kedro run` of the training stage is killed mid-run; a half-written checkpoint (as a kill during a
save leaves) is put beside the real ones; the same command run again resumes from the newest complete
checkpoint, never from the half-written one, trains only the remaining steps and ends at the same final step
and with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import copy_project, run_data_stages
from safetensors.torch import load_file

from vlm_pipeline.recipes import as_cli_params
from vlm_pipeline.training.checkpoints import is_complete

pytestmark = pytest.mark.slow  # Kedro sessions, subprocesses or training runs: `make test` only

STEPS = 40
# Small batches: the claim is about checkpoints and steps, and 40 steps of 4 rows train in a few seconds.
PARAMS = {
    "sft": {
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "save_steps": 4,
        "logging_steps": 1,
        "save_total_limit": 3,
    }
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_models) -> Path:
    """A project copy whose data stages ran (the same for every run here): each test copies it."""
    project = copy_project(tmp_path_factory.mktemp("resume") / "prepared")
    run_data_stages(project, **PARAMS, base_model=str(tiny_models["qwen2_5_vl"]))
    return project


def copy_prepared(prepared: Path, dest: Path) -> Path:
    """The prepared project with a fresh MLflow store (the store records its artifact folder's absolute path)."""
    return Path(shutil.copytree(prepared, dest, ignore=shutil.ignore_patterns("mlflow.db", "mlruns")))


def training_command(base_model: Path) -> list[str]:
    kedro = str(Path(sys.executable).parent / "kedro")
    params = as_cli_params({**PARAMS, "base_model": str(base_model)})
    return [kedro, "run", "--pipelines", "lora", "--tags", "training", "--params", params]


def start_training(project: Path, base_model: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    return subprocess.Popen(
        training_command(base_model),
        cwd=project,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill reaches kedro, accelerate and the trainer
    )


def adapter_weights(project: Path) -> dict[str, torch.Tensor]:
    return load_file(project / "data/06_models/lora/trained/adapter_model.safetensors")


def wait_for_checkpoint(checkpoints: Path, step: int, run: subprocess.Popen, log: Path, limit: float = 300) -> None:
    """Until the running training has completely written checkpoint-``step``; fails if it exits or stalls."""
    deadline = time.monotonic() + limit
    while not list(checkpoints.glob(f"*/checkpoint-{step}/trainer_state.json")):
        assert run.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no checkpoint-{step} within {limit:g} s"
        time.sleep(0.1)


def test_killed_training_resumes_from_the_last_complete_checkpoint(tmp_path, tiny_models, prepared):
    base_model = tiny_models["qwen2_5_vl"]
    project = copy_prepared(prepared, tmp_path / "killed")
    checkpoints = project / "data/06_models/lora/checkpoints"

    run = start_training(project, base_model, tmp_path / "first.log")
    wait_for_checkpoint(checkpoints, 8, run, tmp_path / "first.log")
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL
    assert not (project / "data/06_models/lora/trained").exists()  # nothing that looks finished

    (run_dir,) = checkpoints.iterdir()
    complete = max(
        int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
    )
    assert 8 <= complete < STEPS
    # What a kill during a save leaves: a newer folder with part of the weights and no complete state.
    half = run_dir / "checkpoint-36"
    half.mkdir(exist_ok=True)
    (half / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    (half / "trainer_state.json").write_text('{"global_step": 3')

    rerun = start_training(project, base_model, tmp_path / "second.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    output = (tmp_path / "second.log").read_text()
    resumed = re.search(r"resuming from \S+checkpoint-(\d+)", output)
    assert resumed and int(resumed.group(1)) >= complete and int(resumed.group(1)) != 36, output[-3000:]
    start = int(resumed.group(1))
    assert f"trained steps {start + 1}-{STEPS} of {STEPS} in " in output, output[-3000:]  # only the remaining ones
    assert (run_dir / "incomplete" / "checkpoint-36").is_dir()
    history = json.loads((project / "data/06_models/lora/training_history.json").read_text())
    assert max(entry["step"] for entry in history if "loss" in entry) == STEPS

    # The same command never interrupted: same final step, and the same adapter.
    straight = copy_prepared(prepared, tmp_path / "straight")
    uninterrupted = start_training(straight, base_model, tmp_path / "straight.log")
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    resumed_weights, straight_weights = adapter_weights(project), adapter_weights(straight)
    assert resumed_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-5, msg=name)


def processes_running_in(project: Path) -> list[str]:
    """Command lines of live processes started in ``project`` (kedro, accelerate launch, the trainer)."""
    found = []
    for process in psutil.process_iter(["cwd", "cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if process.info["cwd"] == str(project) and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(" ".join(process.info["cmdline"] or []))
    return found


def test_sigterm_to_kedro_saves_a_checkpoint_stops_everything_and_the_rerun_resumes(tmp_path, tiny_models, prepared):
    """What a cluster does to a job (Slurm cancel, time limit, preemption): SIGTERM to `kedro run` only."""
    base_model = tiny_models["qwen2_5_vl"]
    project = copy_prepared(prepared, tmp_path / "stopped")
    checkpoints = project / "data/06_models/lora/checkpoints"

    run = start_training(project, base_model, tmp_path / "first.log")
    wait_for_checkpoint(checkpoints, 4, run, tmp_path / "first.log")
    os.kill(run.pid, signal.SIGTERM)  # the kedro process alone, not its group
    assert run.wait(timeout=120) != 0
    output = (tmp_path / "first.log").read_text()
    stopped = re.search(r"stopped on SIGTERM after optimizer step (\d+); its checkpoint is (\S+)\.", output)
    assert stopped, output[-3000:]
    step, checkpoint = int(stopped.group(1)), Path(stopped.group(2))
    assert 4 <= step < STEPS and checkpoint.name == f"checkpoint-{step}" and is_complete(checkpoint)
    assert not (project / "data/06_models/lora/trained").exists()
    time.sleep(1)  # the group's last processes are reaped
    assert not processes_running_in(project), processes_running_in(project)

    rerun = start_training(project, base_model, tmp_path / "second.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    output = (tmp_path / "second.log").read_text()
    assert f"resuming from {checkpoint} " in output, output[-3000:]
    assert f"trained steps {step + 1}-{STEPS} of {STEPS} in " in output, output[-3000:]
