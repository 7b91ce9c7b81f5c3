"""Library warnings we understand, hidden before Kedro imports its plugins; every other warning still shows.

Kedro calls ``hide_understood_warnings`` first thing at every ``kedro`` start, as a ``kedro.init`` plugin hook
(pyproject.toml), before it loads the CLI plugins whose import raises them. Warnings then reach logging as
``py.warnings`` records, as under Kedro's own rich handler (``logging.captureWarnings``), and a filter on that
logger drops the understood ones by their text. A ``warnings`` filter cannot: MLflow raises its warnings inside
``catch_warnings`` with its own "once" filter. Nor can conf/logging.yml: Kedro refuses custom filters there.
"""

from __future__ import annotations

import logging

UNDERSTOOD = (
    # MLflow, at every `kedro` start when kedro-mlflow's CLI plugin imports its KedroPipelineModel, whose predict has
    # no type hints (so MLflow could not infer a signature for that class): two lines per start. This project never
    # logs a KedroPipelineModel; its own model (mlflow_model.py) has the hints.
    "Add type hints to the `predict` method",
)


class UnderstoodWarnings(logging.Filter):
    """Drops the ``py.warnings`` records whose text contains one of ``UNDERSTOOD``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in UNDERSTOOD)


def hide_understood_warnings() -> None:
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(existing, UnderstoodWarnings) for existing in warnings_logger.filters):
        warnings_logger.addFilter(UnderstoodWarnings())
