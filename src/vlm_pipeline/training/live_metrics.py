"""Training metrics into the Kedro run's MLflow run while training runs, from the main process only.

The trainer is a subprocess (``accelerate launch``), so the launcher hands it the tracking URI and the run id of
the run kedro-mlflow started; rank 0 logs every ``on_log`` entry as ``train.<name>`` at its optimizer step. A run
that did not launch (its run config had already finished training) logs the saved history the same way, so the
curves are in MLflow either way, once.

No transformers import here: the Kedro process reads this module too, and the callback that uses it
(``trainer.LiveMetrics``) lives with the trainer, which imports transformers anyway.
"""

from __future__ import annotations

import time
from typing import Any

# The Trainer's log keys that are curves (others, such as epoch or total_flos, are not plotted).
CURVES = ("loss", "learning_rate", "grad_norm", "train_loss", "mean_token_accuracy", "eval_loss")
# Per-component curves: grad_norm/<group> (training/component_gradients.py), learning_rate/<component>
# (training/param_groups.py).
CURVE_PREFIXES = ("grad_norm/", "learning_rate/")


def is_curve(key: str, value: Any) -> bool:
    return (
        (key in CURVES or key.startswith(CURVE_PREFIXES))
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    )


def curve_metrics(entry: dict[str, Any], step: int) -> list:
    """One log entry as MLflow ``Metric``s named ``train.<key>``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(f"train.{key}", float(value), now, step) for key, value in entry.items() if is_curve(key, value)]


def log_history(tracking_uri: str, run_id: str, history: list[dict]) -> None:
    """A finished run's saved log history, as the live callback would have logged it."""
    from mlflow import MlflowClient

    metrics = [metric for entry in history for metric in curve_metrics(entry, entry.get("step", 0))]
    client = MlflowClient(tracking_uri)
    for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
