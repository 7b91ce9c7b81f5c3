"""What a Kedro run leaves in MLflow, read back through MlflowClient from a temp sqlite store: the run's name and
tags (git commit, environment, DVC stage, Kedro's run parameters as plain strings), the experiment's UI kind, the
input datasets with digests, the predictions table and the model, still found after the project folder moved, and
the chain's parent runs with their parameters and metrics."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import mlflow.models
import mlflow.pyfunc
import pytest
from conftest import PROJECT_ROOT, SHORT_TRAINING

from vlm_pipeline.architectures import architecture_for_model, load_chat_encoder, load_model
from vlm_pipeline.config.schema import PreprocessingParams
from vlm_pipeline.data.formats import message_text
from vlm_pipeline.mlflow_model import log_model
from vlm_pipeline.scoring import generate_answers

pytestmark = pytest.mark.slow  # a Kedro session with a training run


def git(project, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True).stdout.strip()


STAGES = ("data_validation", "preprocessing", "training", "adapter", "evaluation")


def run_stage(project: Path, *stages: str, **params) -> None:
    """DVC stages as dvc.yaml runs them: ``kedro run --pipelines lora --tags <stage> --env tiny_llama``."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="tiny_llama", runtime_params=params) as session:
        session.run(pipeline_names=["lora"], tags=list(stages))
    while mlflow.active_run():  # see conftest.run_kedro
        mlflow.end_run()


def test_a_run_names_itself_and_records_commit_inputs_and_predictions(project, tiny_models, monkeypatch):
    shutil.copytree(tiny_models["llama"], project / "data/00_base_models/tiny-llama")
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "snapshot")
    commit = git(project, "rev-parse", "HEAD")

    mlflow_yml = project / "conf/base/mlflow.yml"  # a registry (the project's store), so the model is registered
    mlflow_yml.write_text(
        mlflow_yml.read_text().replace("mlflow_registry_uri: null", "mlflow_registry_uri: sqlite:///mlflow.db")
    )

    # The whole chain as one run of its five stages (the serving check is test_chain's: no server here).
    runtime = {**SHORT_TRAINING, "evaluation": {"serving_check": False}}
    run_stage(project, *STAGES, **runtime)

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("vlm-pipeline")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run, parent) = sorted(
        client.search_runs([experiment.experiment_id]), key=lambda r: "mlflow.parentRunId" in r.data.tags, reverse=True
    )
    tags = run.data.tags
    assert tags["mlflow.runName"].startswith(
        "lora · adapter,data_validation,evaluation,preprocessing,training · tiny-llama · "
    )
    assert tags["mlflow.runName"].endswith(" UTC")
    assert tags["mlflow.source.git.commit"] in (commit, f"{commit}-dirty")
    assert tags["kedro.env"] == "tiny_llama" and tags["runner"] == "SequentialRunner"
    # Kedro's run parameters as kedro-mlflow tags them, but plain: no tuple or list reprs.
    assert tags["tags"] == ",".join(STAGES) and tags["pipeline_names"] == "lora"
    assert json.loads(tags["runtime_params"]) == runtime

    # The chain's parent run: its key parameters (as the stage logged them) and data digests, the stage's final
    # metrics (training loss, the evaluation's numbers) and the verdict. A stage that makes the data joins at its end.
    assert tags["mlflow.parentRunId"] == parent.info.run_id and parent.info.status == "FINISHED"
    params = parent.data.params
    assert params["method"] == "LoRA" and params["base_model"] == run.data.params["base_model"]
    for key in ("lora.method.learning_rate", "lora.method.lora.r", "sft.num_train_epochs", "sft.max_steps"):
        assert params[key] == run.data.params[key], key
    assert parent.data.metrics == run.data.metrics and "train.train_loss" in parent.data.metrics
    assert "eval.tuned.exact_match" in parent.data.metrics
    assert parent.data.tags["vlm_pipeline.verdict"] == tags["vlm_pipeline.verdict"]

    # The curves arrived while training ran, not after: the first loss point predates the trained model's files.
    losses = client.get_metric_history(run.info.run_id, "train.loss")
    assert [point.step for point in losses] == sorted({point.step for point in losses}) and losses
    finished_at = (project / "data/06_models/lora/trained/run_info.json").stat().st_mtime * 1000
    assert losses[0].timestamp < finished_at
    # The per-component curves too: the adapters' gradient norm and the language model's learning rate.
    assert {"train.grad_norm/language_model.lora", "train.learning_rate/language_model"} <= set(run.data.metrics)

    inputs = {item.dataset.name: item for item in run.inputs.dataset_inputs}
    assert set(inputs) == {"train_records", "test_records"}
    for name, split, context in (("train_records", "train", "training"), ("test_records", "test", "evaluation")):
        data = (project / "data/02_intermediate" / split / "valid.jsonl").read_bytes()
        assert inputs[name].dataset.digest == params[f"data.{name}.digest"] == hashlib.sha256(data).hexdigest()[:16]
        assert {tag.key: tag.value for tag in inputs[name].tags}["mlflow.data.context"] == context

    # The project folder moves (the old one is gone); the next Kedro context there points the store at it, and
    # every artifact below is read from the new folder.
    moved = project.rename(project.with_name("moved"))
    monkeypatch.chdir(moved)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{moved / 'mlflow.db'}")
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(moved)
    with KedroSession.create(project_path=moved, env="tiny_llama") as session:
        session.load_context()
    mlflow.set_tracking_uri(f"sqlite:///{moved / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    assert client.get_experiment(experiment.experiment_id).artifact_location.startswith(str(moved / "mlruns"))
    assert client.get_run(run.info.run_id).info.artifact_uri.startswith(str(moved / "mlruns"))
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/lora_predictions.json"))
    predictions = (moved / "data/07_model_output/lora/predictions.jsonl").read_text().splitlines()
    assert len(table["data"]) == len(predictions) > 0
    assert {"reference", "base", "tuned"} <= set(table["columns"])

    # The merged model, logged as an MLflow model, loads back and answers as the evaluation did.
    version = client.get_latest_versions("vlm-pipeline-lora")[0]
    assert version.run_id == run.info.run_id
    # Logged as models from code: the code file and a model config, no pickle (python_model.pkl).
    logged = Path(mlflow.artifacts.download_artifacts(f"models:/vlm-pipeline-lora/{version.version}"))
    files = {path.name for path in logged.iterdir()}
    assert "mlflow_model_code.py" in files and not any(name.endswith((".pkl", ".pickle")) for name in files)
    flavor = mlflow.models.Model.load(logged).flavors["python_function"]
    assert flavor["model_code_path"].endswith("mlflow_model_code.py") and "python_model" not in flavor
    assert flavor["config"] == {"max_new_tokens": int(run.data.params["evaluation.max_new_tokens"])}
    model = mlflow.pyfunc.load_model(f"models:/vlm-pipeline-lora/{version.version}")
    first = json.loads(predictions[0])
    prompt = "".join(part["text"] for part in first["prompt"] if part["type"] == "text")
    assert model.predict([{"prompt": prompt}]) == [first["tuned"]]

    # An image prompt: a vision model logged the same way (the tiny Qwen2.5-VL twin as the merged folder) answers
    # each row with its own image, as the evaluation's generation answers that test record.
    qwen = tiny_models["qwen2_5_vl"]
    vision_run = client.create_run(experiment.experiment_id).info.run_id
    log_model(vision_run, qwen, None, max_new_tokens=16)
    vision = mlflow.pyfunc.load_model(f"runs:/{vision_run}/model")
    shapes = PROJECT_ROOT / "data/01_raw/shapes_vqa"
    records = [json.loads(line) for line in (shapes / "test.jsonl").read_text().splitlines()[:2]]
    rows = [{"prompt": message_text(r["messages"][0]), "image": str(shapes / r["images"][0])} for r in records]
    evaluated = generate_answers(
        load_model(qwen).eval(),
        load_chat_encoder(qwen, PreprocessingParams()),
        architecture_for_model(qwen),
        records,
        shapes,
        max_new_tokens=16,
        batch_size=1,
    )
    # The same question about two images gets two answers, and without its image a third: the image is read.
    text_only = vision.predict([{"prompt": rows[0]["prompt"]}])
    assert rows[0]["prompt"] == rows[1]["prompt"] and len({*evaluated, *text_only}) == 3
    assert vision.predict(rows) == evaluated


def test_the_stages_of_one_chain_share_a_parent_run(project, tiny_models, monkeypatch):
    shutil.copytree(tiny_models["llama"], project / "data/00_base_models/tiny-llama")
    git(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "snapshot")
    commit = git(project, "rev-parse", "HEAD")

    run_stage(project, "data_validation")
    run_stage(project, "preprocessing")
    run_stage(project, "data_validation", data_validation={"test_fraction": 0.2})  # other parameters: another chain
    train = project / "data/01_raw/alpaca_glossary/train.jsonl"  # other data (same parameters and commit): another
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:-1]))
    run_stage(project, "data_validation")
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-wren")  # as `dvc exp run` sets it for its stages
    run_stage(project, "data_validation")

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("vlm-pipeline")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    stages = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    parents = {run.info.run_id: run for run in runs if "mlflow.parentRunId" not in run.data.tags}
    assert [run.data.tags["tags"] for run in stages] == ["data_validation", "preprocessing"] + 3 * ["data_validation"]
    assert stages[0].data.tags["mlflow.runName"].startswith("lora · data_validation · tiny-llama · ")
    first, second, other, new_data, experiment_run = (run.data.tags["mlflow.parentRunId"] for run in stages)
    assert first == second and len({first, other, new_data, experiment_run}) == 4
    assert set(parents) == {first, other, new_data, experiment_run}  # nothing else is a top-level run
    name = parents[first].data.tags["mlflow.runName"]
    assert name.startswith(f"lora · tiny-llama · {commit[:8]} · ") and name.endswith(" UTC (DVC stages)")
    assert parents[first].info.status == "FINISHED"
    # Each parent shows the parameters and data that tell it apart.
    assert parents[first].data.params["method"] == "LoRA"
    digest = {run_id: parents[run_id].data.params["data.train_records.digest"] for run_id in parents}
    assert digest[first] == digest[other] != digest[new_data]  # test_fraction applies only without test.jsonl
    assert (
        parents[first].data.params["data.test_records.digest"]
        == parents[new_data].data.params["data.test_records.digest"]
    )
    assert parents[experiment_run].data.tags["dvc.experiment"] == "tidy-wren"
    name = parents[experiment_run].data.tags["mlflow.runName"]
    assert name.startswith("lora · tiny-llama · tidy-wren · ")
