"""Node functions for the run context."""

from __future__ import annotations

from pathlib import Path

from vlm_pipeline.config.run import RunContext
from vlm_pipeline.config.schema import ModelParams


def build_run_context(base_model: Path, raw_images: Path, model: ModelParams) -> RunContext:
    """What every model stage needs to load a model and find a record's images, in one typed value."""
    return RunContext(base_model=base_model, image_root=raw_images, model=model)
