"""The Kedro process follows the trainer's curves file into its MLflow run while the trainer runs (a real MLflow
store in a temp folder; the file written here as the trainer's ``CurvesFile`` writes it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from vlm_pipeline.training.live_metrics import FollowCurves


@pytest.fixture
def mlflow_run(tmp_path) -> tuple[MlflowClient, str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("curves", artifact_location=str(tmp_path / "mlruns")))
    return client, uri, run.info.run_id


def history(client: MlflowClient, run_id: str, name: str = "train.loss") -> list[tuple[int, float]]:
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, name))


def entry(step: int, loss: float) -> str:
    return json.dumps({"loss": loss, "grad_norm": 1.5, "epoch": 0.1 * step, "step": step}) + "\n"


def test_curves_reach_mlflow_while_the_block_runs_and_a_half_written_line_waits(tmp_path, mlflow_run):
    client, uri, run_id = mlflow_run
    curves = tmp_path / "curves.jsonl"
    with FollowCurves(curves, uri, run_id, interval=0.05):
        second = entry(2, 0.5)
        curves.write_text(entry(1, 0.75) + second[:10])
        deadline = time.monotonic() + 20
        while not history(client, run_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert history(client, run_id) == [(1, 0.75)]  # logged live, before the block ends; not the partial line
        with curves.open("a") as handle:
            handle.write(second[10:])
    assert history(client, run_id) == [(1, 0.75), (2, 0.5)]
    assert history(client, run_id, "train.grad_norm") == [(1, 1.5), (2, 1.5)]
    assert "train.epoch" not in client.get_run(run_id).data.metrics  # not a curve


def test_a_failed_launch_keeps_its_error_and_its_curves_up_to_the_failure(tmp_path, mlflow_run):
    client, uri, run_id = mlflow_run
    curves = Path(tmp_path / "curves.jsonl")
    with pytest.raises(RuntimeError, match="launch failed"):
        with FollowCurves(curves, uri, run_id, interval=60):  # no poll in between: only the last drain logs
            curves.write_text(entry(1, 0.75) + entry(2, 0.5))
            raise RuntimeError("launch failed")
    assert history(client, run_id) == [(1, 0.75), (2, 0.5)]
