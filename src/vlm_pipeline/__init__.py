"""vlm-pipeline: JSONL validation → preprocessing → distributed SFT → adapter merge → evaluation.

The five stages live in ``vlm_pipeline.pipelines`` (Kedro wiring) and call plain-Python libraries:
``data`` (formats and validation rules), ``architectures`` (one module per model family),
``training`` (accelerate launcher and TRL trainer entry point), ``adapter`` and ``evaluation``.
"""

__version__ = "0.1.0"
