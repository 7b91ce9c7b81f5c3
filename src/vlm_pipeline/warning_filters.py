"""Library warnings we understand, hidden before Kedro imports its plugins; every other warning still shows.

Kedro calls ``hide_understood_warnings`` first thing at every ``kedro`` start, as a ``kedro.init`` plugin hook
(pyproject.toml), before it loads the CLI plugins whose import raises them; ``vlm-pipeline`` calls it at its own
start. Each is hidden by the narrowest switch there is: a ``warnings`` filter on its text and the module that raises
it, or a filter on the library logger that logs it, matching its text. Warnings reach logging as ``py.warnings``
records, as under Kedro's own rich handler (``logging.captureWarnings``). MLflow's cannot be filtered with
``warnings``: it raises them inside ``catch_warnings`` with its own "once" filter, so its text is matched on
``py.warnings``. Nor can conf/logging.yml do any of this: Kedro refuses custom filters there.
"""

from __future__ import annotations

import logging
import warnings

# Per logger: texts of its records that are dropped.
UNDERSTOOD_RECORDS = {
    # MLflow, at every `kedro` start when kedro-mlflow's CLI plugin imports its KedroPipelineModel, whose predict has
    # no type hints (so MLflow could not infer a signature for that class): two lines per start. This project never
    # logs a KedroPipelineModel; its own model (mlflow_model.py) has the hints.
    "py.warnings": ("Add type hints to the `predict` method",),
    # bitsandbytes, when imported on a CPU with AVX512-BF16: an optional CPU kernel for 4-bit matmuls would come from
    # the `kernels` package, which fetches it from the Hugging Face Hub. This project downloads nothing at run time
    # and never runs 4-bit layers on a CPU outside the tests; bitsandbytes' own CPU path is used instead.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}

# (message regex, module regex) of warnings.warn calls that are ignored.
UNDERSTOOD_WARNINGS = (
    # FastAPI deprecates ORJSONResponse, which kedro-viz's response classes subclass; `kedro viz build` imports them.
    # Nothing for this project to change; kedro-viz's to move off it.
    ("ORJSONResponse is deprecated", r"kedro_viz\."),
)


class UnderstoodRecords(logging.Filter):
    """Drops the records whose text contains one of ``texts``."""

    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def hide_understood_warnings() -> None:
    logging.captureWarnings(True)
    for name, texts in UNDERSTOOD_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, UnderstoodRecords) for existing in logger.filters):
            logger.addFilter(UnderstoodRecords(texts))
    for message, module in UNDERSTOOD_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
