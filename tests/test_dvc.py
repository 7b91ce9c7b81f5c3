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
    """main is reproduced and committed (its metrics and plots are in git); an experiment on other data then shows
    numbers beside main's in `dvc exp show`, `dvc metrics diff` and `dvc plots diff`."""
    project = dvc_project(tmp_path / "project")
    glossary = project / "data/01_raw/alpaca_glossary"
    shutil.rmtree(glossary)
    subset(PROJECT_ROOT / "data/01_raw/alpaca_glossary", glossary, train=32, test=8)
    smaller = subset(
        PROJECT_ROOT / "data/01_raw/alpaca_glossary", project / "data/01_raw/glossary_24", train=24, test=8
    )
    model = tiny_models["llama"]  # outside the project, like /models/... on a GPU host
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **GIT_IDENTITY}
    dvc = str(BIN / "dvc")
    settings = {"env": "tiny_llama", "base_model": str(model), "raw_data": "data/01_raw/alpaca_glossary"}
    (project / "params.yaml").write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))

    result = run([dvc, "repro", "evaluation@lora"], project, **env)
    assert "Running stage 'tiny_model'" not in result.stdout  # another base_model: the tiny default is not built
    # conf/tiny_llama/globals.yml names data/00_base_models/tiny-llama; params.yaml's base_model wins, and says so.
    assert f"conf/tiny_llama/globals.yml has base_model: data/00_base_models/tiny-llama; this run uses {model}" in (
        result.stderr
    )
    main_metrics = json.loads((project / "data/08_reporting/lora/metrics.json").read_text())
    commit_all(project, "main, reproduced")  # metrics.json and the plots are committed with it, as DVC intends
    tracked = run(["git", "ls-files", "data/08_reporting"], project).stdout.split()
    assert {"data/08_reporting/lora/metrics.json", "data/08_reporting/lora/loss_curve.png"} <= set(tracked)

    run([dvc, "exp", "run", "-S", f"raw_data={smaller.relative_to(project)}", "evaluation@lora"], project, **env)
    merged = json.loads((project / "data/06_models/lora/merged/config.json").read_text())
    assert merged["model_type"] == "llama"
    references = {json.loads(line)["output"] for line in (smaller / "test.jsonl").read_text().splitlines()}
    predictions = [json.loads(line) for line in (project / "data/07_model_output/lora/predictions.jsonl").open()]
    assert len(predictions) == 8 and {row["reference"] for row in predictions} == references
    metrics = json.loads((project / "data/08_reporting/lora/metrics.json").read_text())
    details = json.loads((project / "data/08_reporting/lora/detailed_metrics.json").read_text())
    assert metrics["lora"]["em"] == details["tuned"]["exact_match"] and details["merge_check"]["passed"] == 1
    # The environment's own override (conf/tiny_llama/parameters_training.yml) is what the stages ran with.
    resolved = (project / "data/08_reporting/parameters.yml").read_text()
    assert "padding_free: true" in resolved and f"base_model: {model}" in resolved

    shown = json.loads(run([dvc, "exp", "show", "--json"], project, **env).stdout)
    (baseline,) = [commit for commit in shown if commit.get("experiments")]
    metric_file = "data/08_reporting/lora/metrics.json"
    main_shown = baseline["data"]["metrics"][metric_file]["data"]
    assert main_shown["lora"]["em"] == main_metrics["lora"]["em"]
    experiment = next(exp for exp in baseline["experiments"] if exp.get("revs"))["revs"][0]["data"]
    assert experiment["params"]["params.yaml"]["data"]["raw_data"] == "data/01_raw/glossary_24"
    assert experiment["metrics"][metric_file]["data"] == metrics
    assert all(isinstance(value, int | float) for value in flat_values(experiment["metrics"][metric_file]["data"]))
    # The headline reads in a 120-column terminal: its changed columns come whole, none folded into "…". (Without
    # --drop, the changed dependencies' 32-character hashes take most of the width.)
    table = run(
        [dvc, "exp", "show", "--only-changed", "--no-pager", "--drop", "conf|data/"], project, COLUMNS="120", **env
    ).stdout
    assert max(map(len, table.splitlines())) <= 120 and "lora.loss " in table and "raw_data" in table, table
    assert f"{metrics['lora']['loss']:.5g}" in table and "…" not in table, table
    # The workspace holds the experiment: both diffs against the main commit read its files from git.
    diff = json.loads(run([dvc, "metrics", "diff", "HEAD", "--all", "--json"], project, **env).stdout)
    old, new = main_metrics["lora"]["loss"], metrics["lora"]["loss"]
    assert diff[metric_file]["lora.loss"] == {"old": old, "new": new, "diff": pytest.approx(new - old)}
    run([dvc, "plots", "diff", "HEAD", "--json"], project, **env)

    # Editing one key of the environment's parameter files reruns exactly the stages that read it.
    overrides = project / "conf/tiny_llama/parameters_training.yml"
    overrides.write_text(overrides.read_text() + "  logging_steps: 2\n")
    run([dvc, "repro", "parameters"], project, **env)
    status = run([dvc, "status", "--json", "evaluation@lora", "--with-deps"], project, **env)
    assert set(json.loads(status.stdout)) == {"training@lora"}, status.stdout


def flat_values(tree):
    """Every leaf of a nested metrics dict."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from flat_values(value)
    else:
        yield tree
