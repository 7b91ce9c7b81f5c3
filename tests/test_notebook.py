"""The notebook runs: executed headless after a real run, its kernel started in notebooks/ as Jupyter starts it.

This is what a new user does after `make run`, and what failed three ways: no Jupyter in the dependencies,
`%reload_kedro .` looking for the project in notebooks/, and no plot because the project switched matplotlib to
Agg when imported. The `notebook` extra (installed by `make install`) brings nbclient and the kernel.
"""

from __future__ import annotations

import json
import re
import shutil

import mlflow
import pytest
from conftest import PROJECT_ROOT, copy_run

nbformat = pytest.importorskip("nbformat", reason="the `notebook` extra is not installed: pip install -e '.[notebook]'")
nbclient = pytest.importorskip("nbclient", reason="the `notebook` extra is not installed: pip install -e '.[notebook]'")
pytest.importorskip("ipykernel", reason="the `notebook` extra is not installed: pip install -e '.[notebook]'")

pytestmark = pytest.mark.slow  # a Kedro session and a training run, then a Jupyter kernel


def test_explore_run_executes_from_the_notebooks_folder_and_shows_the_loss_plot(tmp_path, monkeypatch, short_lora_run):
    project = copy_run(short_lora_run, tmp_path / "project")  # after `kedro run --pipelines lora`, shortened
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    folder = project / "notebooks"
    shutil.copytree(PROJECT_ROOT / "notebooks", folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    notebook = nbformat.read(folder / "explore_run.ipynb", as_version=4)

    # Raises CellExecutionError, with the cell and its traceback, on the first cell that fails.
    nbclient.NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(folder)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 2, [output.get("data", {}).keys() for output in outputs]  # the answer grid, the loss plot
    assert any("majority EM" in output.get("text", "") for output in outputs)  # the metrics table was printed

    # The same run's report shows its wrong answers with their images, linked from the report's own folder, and
    # MLflow holds them as a table with thumbnails (issue 23).
    report_folder = project / "data/08_reporting/lora"
    links = re.findall(r'<img src="([^"]+)"', (report_folder / "report.md").read_text(encoding="utf-8"))
    assert links and all((report_folder / link).is_file() for link in links), links
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["vlm-pipeline"], output_format="list")
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/lora_wrong_answers.json"))
    assert len(table["data"]) >= len(links) and table["columns"][-1] == "image"
