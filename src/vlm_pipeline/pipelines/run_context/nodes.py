"""Node functions for the run context."""

from __future__ import annotations

from pathlib import Path

from vlm_pipeline.config.run import RunContext
from vlm_pipeline.config.schema import ModelParams


def build_run_context(base_model: Path, project_folder: Path, model: ModelParams) -> RunContext:
    """What every model stage needs to load a model and find a record's images, in one typed value. Validated image
    paths are relative to the project folder (the raw folder's images and the decoded ones alike)."""
    return RunContext(base_model=base_model, image_root=project_folder, model=model)
