"""The stages that load no model import no torch, transformers, PEFT or TRL: each `kedro run` and DVC stage starts
with the pipeline registry, and these libraries cost seconds to import (docs/architecture.md, "Start-up").

Python's own import log (``-X importtime``) lists every module a process imported, so the check sees imports made
anywhere: by the registry, a hook, a catalog dataset or a node."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, copy_project

MODEL_LIBRARIES = {"torch", "transformers", "peft", "trl"}


def imported_packages(log: str) -> set[str]:
    """The top-level packages an ``-X importtime`` log names (``import time: self | cumulative | name``)."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in log.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def run_logging_imports(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return result, imported_packages(result.stderr)


def test_the_import_log_is_read():
    """The parser on a real log and on a line naming a torch submodule, so an empty set below is not a misread log."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import json"], capture_output=True, text=True, check=True
    )
    assert "json" in imported_packages(result.stderr)
    assert imported_packages("import time:       231 |     452169 |       torch._C\n") == {"torch"}


@pytest.mark.slow
def test_data_validation_imports_no_model_library(tmp_path):
    """`kedro run --tags data_validation` on the demo, and `vlm-pipeline validate`, never import a model library."""
    project = copy_project(tmp_path / "project")
    validated, imported = run_logging_imports(
        ["-m", "kedro", "run", "--pipelines", "lora", "--tags", "data_validation"], project
    )
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert (project / "data/02_intermediate/train/valid.jsonl").is_file()
    assert {"kedro", "datasets", "PIL"} <= imported, "the log lists the run's own imports"
    assert imported.isdisjoint(MODEL_LIBRARIES), sorted(imported & MODEL_LIBRARIES)

    raw = PROJECT_ROOT / "data/01_raw/shapes_vqa"
    checked, imported = run_logging_imports(
        ["-m", "vlm_pipeline", "validate", str(raw / "test.jsonl"), "--image-root", str(raw)]
        + ["--output-dir", str(tmp_path / "validated")],
        tmp_path,
    )
    assert checked.returncode == 0 and "96 valid, 0 quarantined" in checked.stdout, checked.stderr[-3000:]
    assert imported.isdisjoint(MODEL_LIBRARIES), sorted(imported & MODEL_LIBRARIES)


@pytest.mark.slow
def test_the_commands_that_print_import_no_model_library(tmp_path):
    """`vlm-pipeline recipe NAME` and `vlm-pipeline parameters` (the DVC stage every `dvc repro` runs first) print
    from the configuration alone: no model library."""
    printed, imported = run_logging_imports(["-m", "vlm_pipeline", "recipe", "c"], PROJECT_ROOT)
    assert printed.returncode == 0 and "kedro run --pipelines full_ft" in printed.stdout, printed.stderr[-3000:]
    assert imported.isdisjoint(MODEL_LIBRARIES), sorted(imported & MODEL_LIBRARIES)

    out = tmp_path / "parameters.yml"
    arguments = ["--env", "base", "--base-model", "data/00_base_models/tiny-qwen2_5_vl"]
    arguments += ["--raw-data", "data/01_raw/shapes_vqa", "--out", str(out)]
    written, imported = run_logging_imports(["-m", "vlm_pipeline", "parameters", *arguments], PROJECT_ROOT)
    assert written.returncode == 0 and "preprocessing:" in out.read_text(), written.stderr[-3000:]
    assert imported.isdisjoint(MODEL_LIBRARIES), sorted(imported & MODEL_LIBRARIES)
