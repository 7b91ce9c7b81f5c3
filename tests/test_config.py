"""Bad configuration fails in seconds, naming the key, before any node runs or any model loads."""

from __future__ import annotations

import copy
import dataclasses
import logging

import mlflow
import pytest
from conftest import PROJECT_ROOT
from kedro.config import OmegaConfigLoader
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from pydantic import BaseModel

from vlm_pipeline import settings
from vlm_pipeline.config import ConfigError, Parameters, SFTParams, check_parameters, normalise_sft, validate_parameters
from vlm_pipeline.config.schema import LAUNCHER_KEYS, OPTIMIZERS, SCHEDULERS, _model_in


def load_params(env: str = "base") -> dict:
    args = {k: v for k, v in settings.CONFIG_LOADER_ARGS.items() if k not in ("base_env", "default_run_env")}
    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env=env, **args)
    return loader["parameters"]


# Free-form mappings whose keys belong to another library (template variables), not to the schema.
FREE_FORM = {("preprocessing", "template_kwargs")}


def leaf_paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix + (key,) not in FREE_FORM:
            paths += leaf_paths(value, prefix + (key,))
        else:
            paths.append(prefix + (key,))
    return paths


def all_models(model: type[BaseModel] = Parameters, seen: set | None = None) -> set[type[BaseModel]]:
    seen = set() if seen is None else seen
    seen.add(model)
    for field in model.model_fields.values():
        inner = _model_in(field.annotation)
        if inner is not None and inner not in seen:
            all_models(inner, seen)
    return seen


@pytest.mark.parametrize("path", sorted(leaf_paths(load_params())), ids=".".join)
def test_a_typo_in_any_committed_parameter_is_named_with_the_closest_key(path):
    params = copy.deepcopy(load_params())
    parent = params
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1] + "x"] = parent.pop(path[-1])
    typo = ".".join(path) + "x"
    with pytest.raises(ConfigError, match=rf"unknown key {typo}; did you mean {'.'.join(path)}\?"):
        validate_parameters(params)


def test_every_schema_field_has_help_text_and_sft_fields_are_trl_fields():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    from trl import SFTConfig

    for model in all_models():
        for name, field in model.model_fields.items():
            assert field.description or _model_in(field.annotation), f"{model.__name__}.{name} has no help text"
    trl_fields = {field.name for field in dataclasses.fields(SFTConfig)}
    assert set(SFTParams.model_fields) - LAUNCHER_KEYS <= trl_fields
    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}
    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}


def test_every_command_and_option_has_help_text():
    """`vlm-pipeline` and the project's `kedro` commands: each subcommand has a description and each option and
    argument a help line; the top-level help is for users (no note about the module's name)."""
    import argparse

    from vlm_pipeline.cli import cli
    from vlm_pipeline.commands import build_parser

    parser = build_parser()
    assert "cli.py" not in parser.format_help()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    missing = []
    for name, command in commands.choices.items():
        if not command.description:
            missing.append(name)
        missing += [f"{name} {action.dest}" for action in command._actions if not (action.help or "").strip()]
    for name, command in cli.commands.items():
        if not command.help:
            missing.append(f"kedro {name}")
        missing += [f"kedro {name} {param.name}" for param in command.params if not getattr(param, "help", "x")]
    assert missing == []


def test_seed_legacy_names_are_mapped_or_rejected_with_the_new_name(caplog):
    with caplog.at_level(logging.WARNING, logger="vlm_pipeline.config"):
        assert normalise_sft({"evaluation_strategy": "steps", "eval_steps": 5, "warmup_ratio": 0.1}) == {
            "eval_strategy": "steps",
            "eval_steps": 5,
            "warmup_steps": 0.1,
        }
        assert normalise_sft({"save_safetensors": True}) == {}
    assert "sft.evaluation_strategy is an older name; using sft.eval_strategy" in caplog.text
    assert "sft.save_safetensors is an older setting" in caplog.text
    with pytest.raises(ConfigError, match=r"sft: max_seq_length .*preprocessing\.max_length"):
        normalise_sft({"max_seq_length": 512})
    with pytest.raises(ConfigError, match=r"fp16_opt_level .*use sft.fp16 or sft.bf16"):
        normalise_sft({"fp16_opt_level": "O1"})
    with pytest.raises(ConfigError, match="warmup_steps and warmup_ratio are both set"):
        normalise_sft({"warmup_ratio": 0.1, "warmup_steps": 100})
    with pytest.raises(ConfigError, match="hub_token .*HF_TOKEN environment variable"):
        normalise_sft({"hub_token": "hf_x"})


BASE = {"raw_data": "data/01_raw/shapes_vqa", "base_model": "data/00_base_models/tiny-qwen2_5_vl"}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sft": {"bf16": True, "fp16": True}}, "fp16 and bf16 are both true"),
        (
            {"sft": {"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 300, "save_steps": 500}},
            "save_steps to be a multiple of eval_steps",
        ),
        ({"sft": {"load_best_model_at_end": True, "eval_strategy": "no"}}, "needs eval_strategy steps or epoch"),
        ({"sft": {"warmup_steps": 2.5}}, "neither a whole number of steps nor a share below 1"),
        ({"sft": {"optim": "adamw"}}, "sft.optim: Input should be .*did you mean"),
        ({"sft": {"remove_unused_columns": True}}, "collator reads the image_paths column"),
        (
            {"full_ft": {"method": {"learning_rate": 1e-5, "quantization": {"load_in_4bit": True}}}},
            "4-bit base cannot be fully fine-tuned",
        ),
        (
            {
                "lora": {
                    "method": {
                        "learning_rate": 1e-4,
                        "lora": {"r": 8},
                        "quantization": {"load_in_4bit": True, "load_in_8bit": True},
                    }
                }
            },
            "load_in_8bit and load_in_4bit are both true",
        ),
        (
            {"full_ft": {"method": {"learning_rate": 1e-5, "lora": {"r": 8}}}},
            "full_ft.method has a lora",
        ),
        ({"preprocessing": {"images": {"min_pixels": 10000, "max_pixels": 5000}}}, "min_pixels 10000 is larger"),
    ],
)
def test_impossible_combinations_fail_with_a_reason(params, message):
    with pytest.raises(ConfigError, match=message):
        validate_parameters({**BASE, **params})


def test_machine_checks_name_the_accelerate_file(tmp_path):
    (tmp_path / "gpu8.yaml").write_text("use_cpu: false\nnum_processes: 8\n")
    (tmp_path / "ds.yaml").write_text("use_cpu: true\ndeepspeed_config: {gradient_accumulation_steps: 4}\n")
    (tmp_path / "bf16.yaml").write_text("use_cpu: true\nmixed_precision: bf16\n")
    with pytest.raises(ConfigError, match="gpu8.yaml runs 8 process.* this machine has 0 GPU"):
        check_parameters({**BASE, "sft": {"accelerate_config": "gpu8.yaml"}}, tmp_path)  # CI has no GPU
    with pytest.raises(ConfigError, match="gradient_accumulation_steps 4 but sft.gradient_accumulation_steps is 1"):
        check_parameters({**BASE, "sft": {"accelerate_config": "ds.yaml"}}, tmp_path)
    with pytest.raises(ConfigError, match="mixed_precision bf16 but sft asks for no"):
        check_parameters({**BASE, "sft": {"accelerate_config": "bf16.yaml"}}, tmp_path)
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        check_parameters({**BASE, "sft": {"accelerate_config": "missing.yaml"}}, tmp_path)
    check_parameters({**BASE, "sft": {"accelerate_config": "bf16.yaml", "bf16": True}}, tmp_path)  # CPU bf16 runs


def test_trust_remote_code_is_off_by_default_and_warns_when_on(caplog, tmp_path):
    (tmp_path / "cpu.yaml").write_text("use_cpu: true\n")
    cpu = {"sft": {"accelerate_config": "cpu.yaml"}}
    assert check_parameters({**BASE, **cpu}, tmp_path).model.trust_remote_code is False
    with caplog.at_level(logging.WARNING, logger="vlm_pipeline.config"):
        check_parameters({**BASE, **cpu, "model": {"trust_remote_code": True}}, tmp_path)
    assert "model.trust_remote_code is true" in caplog.text
    with pytest.raises(ConfigError, match="trust_remote_code moved to model.trust_remote_code"):
        check_parameters({**BASE, **cpu, "trust_remote_code": True}, tmp_path)


@pytest.mark.parametrize("where", [("sft",), ("lora", "method")])
def test_an_output_dir_parameter_is_refused_because_the_catalog_owns_paths(where):
    params = {"sft": {}, "lora": {"method": {"learning_rate": 1e-4, "lora": {"r": 8}}}}
    section = params[where[0]] if len(where) == 1 else params[where[0]][where[1]]
    section["output_dir"] = "out"
    with pytest.raises(ConfigError, match="catalog"):
        validate_parameters({**BASE, **params})


@pytest.mark.slow
def test_a_bad_parameter_stops_the_run_before_any_node(project):
    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params={"sft": {"evaluation_strateg": "steps"}}) as session:
        with pytest.raises(ConfigError, match="did you mean sft.evaluation_strategy|did you mean sft.eval_strategy"):
            session.run(pipeline_names=["lora"])
    assert not (project / "data/02_intermediate").exists()
    while mlflow.active_run():  # kedro-mlflow may have opened the run before the check stopped it
        mlflow.end_run()


# Per-variant method blocks are choices, not defaults: learning_rate has none in the schema, and
# conf/base's demo trains lm_head in full (modules_to_save), which the schema must not impose on an 8B recipe.
VARIANT_BLOCKS = ("lora", "full_ft")


def schema_disagreements(model: type[BaseModel], values: dict, prefix: str = "") -> list[str]:
    found = []
    for name, field in model.model_fields.items():
        if name not in values or (not prefix and name in VARIANT_BLOCKS):
            continue
        inner = _model_in(field.annotation)
        if (
            inner is not None
            and isinstance(values[name], dict)
            and (prefix + name) not in {".".join(p) for p in FREE_FORM}
        ):
            found += schema_disagreements(inner, values[name], f"{prefix}{name}.")
        elif not field.is_required() and field.get_default(call_default_factory=True) != values[name]:
            found.append(
                f"{prefix}{name}: schema {field.get_default(call_default_factory=True)!r}, conf/base {values[name]!r}"
            )
    return found


def test_the_schema_defaults_are_conf_bases_values():
    """One set of defaults: a value written in conf/base/parameters*.yml is the schema's default, so a run config
    resolved from the schema alone (the trainer's, the tests') trains as `kedro run` does."""
    assert schema_disagreements(Parameters, load_params()) == []


def test_every_committed_parameter_has_its_comment():
    """Each key set in conf/base has a comment line directly above it (or at its end): what it does, its range."""
    missing = []
    for path in sorted((PROJECT_ROOT / "conf/base").glob("parameters*.yml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            key, _, value = line.strip().partition(":")
            if not key or key.startswith(("#", "-")) or not _ or not value.strip():
                continue  # comments, list items, and mappings whose keys carry the comments
            above = lines[number - 1].strip() if number else ""
            if not above.startswith("#") and "#" not in value:
                missing.append(f"{path.name}:{number + 1}: {key}")
    assert missing == []


def test_num_proc_auto_is_this_host_s_cores_in_every_recipe_environment():
    """The recipes' GPU environments tokenise in one process per core (at most 32); a bad value is one line."""
    import os

    from vlm_pipeline.recipes import RECIPES

    for recipe in RECIPES.values():
        preprocessing = validate_parameters(load_params(recipe.env)).preprocessing
        assert preprocessing.num_proc == "auto", recipe.env
        assert preprocessing.processes == min(os.cpu_count(), 32)
    assert validate_parameters(load_params()).preprocessing.processes == 1  # the demo: one process
    params = load_params()
    params["preprocessing"]["num_proc"] = "many"
    with pytest.raises(ConfigError) as error:
        validate_parameters(params)
    assert str(error.value) == (
        "preprocessing.num_proc: expected a count of processes from 1 to 256, or auto; got 'many'"
    )
