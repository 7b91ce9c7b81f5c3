"""Stage 5: the base and the tuned model on the same test records with the same settings."""

from vlm_pipeline.pipelines.evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
