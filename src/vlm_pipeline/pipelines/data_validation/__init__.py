"""Stage 1: every raw line becomes a valid normalised record or a quarantined one with its reason."""

from vlm_pipeline.pipelines.data_validation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
