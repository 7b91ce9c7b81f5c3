"""Training metrics into the Kedro run's MLflow run while training runs.

The trainer is a subprocess (``accelerate launch``). Its main process appends every ``on_log`` entry to a
JSON-lines file (``trainer.CurvesFile``), and the Kedro process, which already has the run open, follows that file
and logs each entry as ``train.<name>`` at its optimizer step (``FollowCurves``). The trainer so never imports
MLflow or opens its store. A run that did not launch (its run config had already finished training) logs the saved
history the same way, so the curves are in MLflow either way, once.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
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
    """A finished run's saved log history, as it would have been logged while training."""
    from mlflow import MlflowClient

    log_entries(MlflowClient(tracking_uri), run_id, history)


def log_entries(client: Any, run_id: str, entries: list[dict]) -> None:
    """Log entries (each with its optimizer ``step``) to one run, in batches."""
    metrics = [metric for entry in entries for metric in curve_metrics(entry, entry.get("step", 0))]
    for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


class FollowCurves:
    """While the block runs, a thread reads the entries appended to ``path`` and logs them to one MLflow run; on
    leaving, the last ones are logged too. Only complete lines are read, so a line being written waits."""

    def __init__(self, path: Path, tracking_uri: str, run_id: str, interval: float = 0.5):
        from mlflow import MlflowClient

        self.path, self.run_id, self.interval = path, run_id, interval
        self.client = MlflowClient(tracking_uri)
        self.offset = 0
        self.error: Exception | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="follow-curves", daemon=True)

    def __enter__(self) -> FollowCurves:
        self.thread.start()
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        if exc_type is not None:  # the curves up to the failure, but the launch's own error is the one to see
            with contextlib.suppress(Exception):
                self._log_new_entries()
            return
        if self.error is not None:
            raise self.error
        self._log_new_entries()

    def _follow(self) -> None:
        try:
            while not self.done.wait(self.interval):
                self._log_new_entries()
        except Exception as error:  # raised in the Kedro thread when the block ends
            self.error = error

    def _log_new_entries(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as curves:
            curves.seek(self.offset)
            text = curves.read()
        complete = text[: text.rfind(b"\n") + 1]
        self.offset += len(complete)
        log_entries(self.client, self.run_id, [json.loads(line) for line in complete.splitlines() if line.strip()])
