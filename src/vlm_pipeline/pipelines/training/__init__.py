"""Stage 3: a thin launcher around the TRL trainer module, run under ``accelerate launch``."""

from vlm_pipeline.pipelines.training.pipeline import create_pipeline

__all__ = ["create_pipeline"]
