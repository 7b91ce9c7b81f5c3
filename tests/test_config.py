"""Bad configuration fails in seconds, naming the key, before any node runs or any model loads."""

from __future__ import annotations

import logging

import mlflow
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from vlm_pipeline.config import ConfigError, check_parameters, check_sft_combinations, normalise_sft


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown key sft\.learning_rat; did you mean sft\.learning_rate\?"):
        normalise_sft({"learning_rat": 1e-4})
    with pytest.raises(ConfigError, match=r"lora\.method\.lora\.lora_alfa; did you mean lora\.method\.lora\.lora_alpha"):
        check_parameters({"sft": {}, "lora": {"method": {"lora": {"r": 8, "lora_alfa": 16}}}})


def test_seed_legacy_names_are_mapped_or_rejected_with_the_new_name(caplog):
    with caplog.at_level(logging.WARNING, logger="vlm_pipeline.config"):
        assert normalise_sft({"evaluation_strategy": "steps", "warmup_ratio": 0.1}) == {
            "eval_strategy": "steps",
            "warmup_steps": 0.1,
        }
    assert "sft.evaluation_strategy is an older name; using sft.eval_strategy" in caplog.text
    with pytest.raises(ConfigError, match=r"sft\.max_seq_length .*preprocessing\.max_length"):
        normalise_sft({"max_seq_length": 512})
    with pytest.raises(ConfigError, match=r"sft\.fp16_opt_level"):
        normalise_sft({"fp16_opt_level": "O1"})
    with pytest.raises(ConfigError, match="set twice"):
        normalise_sft({"warmup_ratio": 0.1, "warmup_steps": 100})


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="no GPU with bf16"):
        check_sft_combinations({"bf16": True})  # this machine (and CI) has no GPU
    with pytest.raises(ConfigError, match="multiple of eval_steps"):
        check_sft_combinations({"load_best_model_at_end": True, "eval_steps": 300, "save_steps": 500})
    check_sft_combinations({"load_best_model_at_end": True, "eval_steps": 500, "save_steps": 2000})


def test_a_bad_parameter_stops_the_run_before_any_node(project):
    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params={"sft": {"evaluation_strateg": "steps"}}) as session:
        with pytest.raises(ConfigError, match="did you mean sft.evaluation_strategy|did you mean sft.eval_strategy"):
            session.run(pipeline_names=["lora"])
    assert not (project / "data/02_intermediate").exists()
    while mlflow.active_run():  # kedro-mlflow may have opened the run before the check stopped it
        mlflow.end_run()
