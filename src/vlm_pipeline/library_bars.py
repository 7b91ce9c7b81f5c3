"""Library progress bars only where someone watches them: on a terminal, where tqdm redraws one line in place.

In a log file or CI each redraw is kept, so a bar becomes one long line of \\r-joined redraws, and the line before
it already names the step. This module imports no torch or transformers: every ``kedro run`` calls it in its
``before_pipeline_run`` hook, including the stages that never load a model.
"""

from __future__ import annotations

import os
import sys


def on_terminal() -> bool:
    """Whether someone watches the output live, so tqdm's bar (drawn on stderr) redraws in place."""
    return sys.stderr.isatty()


def hide_library_bars_in_logs() -> None:
    """Outside a terminal, no progress bars from datasets (map, save_to_disk), transformers (loading and writing
    weights) or MLflow (copying a logged model's files)."""
    if on_terminal():
        return
    import datasets
    import huggingface_hub.utils

    datasets.disable_progress_bars()
    # transformers takes its switch's first value from the hub's when it is first imported (utils/logging.py), so
    # a process that has not imported it yet is covered without paying for the import; one that has is told too.
    huggingface_hub.utils.disable_progress_bars()
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        transformers_logging.disable_progress_bar()
    # MLflow's documented switch, read at each copy; a value the user set wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
