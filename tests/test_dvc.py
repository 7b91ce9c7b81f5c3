"""`dvc exp run -S env=... -S base_model=... -S raw_data=...`: any conf environment, model and data through DVC,
without editing dvc.yaml, and DVC tracking the parameters that environment really gives each stage."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import PROJECT_ROOT
from test_cli_dvc_viz import BIN, commit_all, dvc_project, run, subset

pytestmark = pytest.mark.slow  # kedro subprocesses and a training run: `make test` only

# `dvc exp run` commits the experiment.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def test_dvc_exp_run_on_another_environment_model_and_data(tmp_path, tiny_models):
    project = dvc_project(tmp_path / "project")
    glossary = project / "data/01_raw/alpaca_glossary"
    shutil.rmtree(glossary)
    subset(PROJECT_ROOT / "data/01_raw/alpaca_glossary", glossary, train=32, test=8)
    commit_all(project, "project")  # an experiment is a commit on top of one
    model = tiny_models["llama"]  # outside the project, like /models/... on a GPU host
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **GIT_IDENTITY}
    dvc = str(BIN / "dvc")
    settings = ["-S", "env=tiny_llama", "-S", f"base_model={model}", "-S", "raw_data=data/01_raw/alpaca_glossary"]

    result = run([dvc, "exp", "run", *settings, "evaluation@lora"], project, **env)
    assert "Running stage 'tiny_model'" not in result.stdout  # another base_model: the tiny default is not built
    # conf/tiny_llama/globals.yml names data/00_base_models/tiny-llama; params.yaml's base_model wins, and says so.
    assert f"conf/tiny_llama/globals.yml has base_model: data/00_base_models/tiny-llama; this run uses {model}" in (
        result.stderr
    )
    merged = json.loads((project / "data/06_models/lora/merged/config.json").read_text())
    assert merged["model_type"] == "llama"
    references = {json.loads(line)["output"] for line in (glossary / "test.jsonl").read_text().splitlines()}
    predictions = [json.loads(line) for line in (project / "data/07_model_output/lora/predictions.jsonl").open()]
    assert len(predictions) == 8 and {row["reference"] for row in predictions} == references
    metrics = json.loads((project / "data/08_reporting/lora/metrics.json").read_text())
    assert {"base", "tuned"} <= set(metrics) and metrics["merge_check"]["passed"]
    # The environment's own override (conf/tiny_llama/parameters_training.yml) is what the stages ran with.
    resolved = (project / "data/08_reporting/parameters.yml").read_text()
    assert "padding_free: true" in resolved and f"base_model: {model}" in resolved
    shown = json.loads(run([dvc, "exp", "show", "--json"], project, **env).stdout)
    experiment = next(exp for commit in shown for exp in commit.get("experiments") or [] if exp.get("revs"))
    data = experiment["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["env"] == "tiny_llama"
    assert data["metrics"]["data/08_reporting/lora/metrics.json"]["data"]["tuned"] == metrics["tuned"]

    # Editing one key of the environment's parameter files reruns exactly the stages that read it.
    overrides = project / "conf/tiny_llama/parameters_training.yml"
    overrides.write_text(overrides.read_text() + "  logging_steps: 2\n")
    run([dvc, "repro", "parameters"], project, **env)
    status = run([dvc, "status", "--json", "evaluation@lora", "--with-deps"], project, **env)
    assert set(json.loads(status.stdout)) == {"training@lora"}, status.stdout
