"""A merge killed midway leaves the previous merged model in place, complete and loadable, never a half-written one.

The merge stage writes into a hidden staging folder beside the output and renames it into place only after the
logits check passed; this kills a real `kedro run` of the adapter stage while the staging folder is being filled.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_run

from vlm_pipeline.architectures import load_model
from vlm_pipeline.model_files import check_full_model

pytestmark = pytest.mark.slow  # Kedro sessions, subprocesses or training runs: `make test` only


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_merge_keeps_the_previous_model(tmp_path, tiny_models, short_lora_run):
    project = copy_run(short_lora_run, tmp_path / "project", tracking=False)  # a finished lora chain
    merged = project / "data/06_models/lora/merged"
    before = {path.name: digest(path) for path in merged.iterdir()}

    command = [
        str(Path(sys.executable).parent / "kedro"),
        "run",
        "--pipelines",
        "lora",
        "--tags",
        "adapter",
        "--params",
        "adapter.merge_dtype=bfloat16",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    merge = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not list(merged.parent.glob(".merged.staging-*/model.safetensors")):  # the new model is being written
        assert merge.poll() is None, "the merge finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(merge.pid, signal.SIGKILL)
    merge.wait()
    assert merge.returncode == -signal.SIGKILL

    assert {path.name: digest(path) for path in merged.iterdir()} == before  # the previous output, untouched
    assert check_full_model(merged, tiny_models["qwen2_5_vl"])["matches_base"]  # and complete: every base tensor
    load_model(merged)  # loadable on its own (a missing tensor fails the load)
    assert list(merged.parent.glob(".merged.staging-*"))  # the interrupted work stayed in its hidden staging folder
