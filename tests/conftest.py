"""Shared fixtures: tiny models built once per session, and throw-away copies of the Kedro project."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pyproject.toml", ".telemetry", "dvc.yaml", "README.md")
PROJECT_DIRS = ("conf", "data/01_raw", "src")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The three tiny architectures, built offline with the project's own builder (seed 0)."""
    from vlm_pipeline.architectures import get_architecture

    root = tmp_path_factory.mktemp("models")
    return {name: get_architecture(name).build_tiny(root / name, 0) for name in ("qwen2_5_vl", "mllama", "llama")}


def copy_project(dest: Path) -> Path:
    """A copy of the project's config and raw data, where a run may write freely."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy2(PROJECT_ROOT / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(PROJECT_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project copy as the working directory, with its own MLflow store (sqlite in the temp dir)."""
    root = copy_project(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    return root
