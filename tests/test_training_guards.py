"""Runs that cannot help stop with their cause, and each component trains at its own rate: a diverged loss stops
the run (``sft.divergence_check``), a trainable component without gradient stops it, and each component's gradient
norm and learning rate are logged; ``method.learning_rates`` become the optimizer's groups."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PROJECT_ROOT, run_context, trainer_run_config

from vlm_pipeline.architectures import ARCHITECTURES, load_model
from vlm_pipeline.config.schema import ConfigError, MethodParams, SFTParams, validate_parameters
from vlm_pipeline.data.validation import validate_lines
from vlm_pipeline.training import guards
from vlm_pipeline.training.param_groups import component_parameter_groups
from vlm_pipeline.training.trainable import COMPONENTS, component_of

SHAPES = PROJECT_ROOT / "data/01_raw/shapes_vqa"
# The demo's own LoRA method (conf/base): all linear layers of the language model, lm_head trained in full.
DEMO_METHOD = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_training.yml").read_text())["lora"]["method"]
# LoRA in the language model, the vision tower's blocks and the projector (Qwen2.5-VL's merger).
EVERY_COMPONENT = (
    r"model\.language_model\.layers\.\d+\.self_attn\.(q|v)_proj"
    r"|model\.visual\.blocks\.\d+\.attn\.qkv|model\.visual\.merger\.mlp\.[02]"
)


def test_the_divergence_rule_is_the_one_the_parameter_states():
    help_text = SFTParams.model_fields["divergence_check"].description
    stated = f"last {guards.RECENT_STEPS} steps is above {guards.DIVERGENCE_FACTOR:g} times the mean of the first "
    assert stated + f"{guards.START_STEPS} steps" in help_text


def test_component_learning_rates_are_checked_against_the_components():
    assert MethodParams(learning_rate=1e-3, learning_rates={"vision_tower": 2e-6}).learning_rates == {
        "vision_tower": 2e-6
    }
    assert set(MethodParams.model_fields["freeze"].default_factory().model_dump()) == set(COMPONENTS)
    params = {"raw_data": "data/01_raw/shapes_vqa", "base_model": "data/00_base_models/tiny-qwen2_5_vl"}
    for method, message in [
        ({"learning_rates": {"vit": 1e-5}}, "vision_tower"),  # not a component: the valid names are listed
        ({"learning_rates": {"projector": 1.5}}, "less than 1"),
        ({"learning_rates": {"projector": 1e-4}, "freeze": {"projector": True}}, "which freeze keeps frozen"),
    ]:
        with pytest.raises(ConfigError, match=message) as raised:
            validate_parameters({**params, "full_ft": {"method": {"learning_rate": 1e-3, **method}}})
        assert "full_ft.method" in str(raised.value)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_family_s_parameters_map_to_its_components_groups(tiny_models, arch):
    architecture = ARCHITECTURES[arch]
    model = load_model(tiny_models[arch])
    rates = {"language_model": 3e-4, **({"vision_tower": 2e-6, "projector": 1e-5} if architecture.is_vision else {})}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {n for n in names.values() if not n.endswith("bias") and "norm" not in n}
    groups = component_parameter_groups(model, architecture, 1e-3, rates, 0.1, decay)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(names)  # every trainable parameter, once (tied weights are one parameter)
    for group in groups:
        assert {component_of(names[id(p)], architecture) for p in group["params"]} == {group["component"]}
        assert group["lr"] == rates[group["component"]]
        assert group["weight_decay"] == (0.1 if names[id(group["params"][0])] in decay else 0.0)
    assert {group["component"] for group in groups} == set(rates)
    assert groups[0]["component"] == "language_model"  # transformers logs the first group's rate


# --- real training runs on the tiny Qwen2.5-VL ----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, tiny_models) -> Path:
    """The demo's first 40 image questions, validated and tokenised for the tiny Qwen2.5-VL as the stages do."""
    from vlm_pipeline.config.schema import PreprocessingParams
    from vlm_pipeline.pipelines.preprocessing.nodes import tokenize_split

    lines = (SHAPES / "train.jsonl").read_bytes().splitlines()[:40]
    records = validate_lines(lines, SHAPES, max_image_pixels=10**8).valid
    context = run_context(tiny_models["qwen2_5_vl"], SHAPES)
    train, quarantine, _ = tokenize_split(records, context, PreprocessingParams())
    assert not quarantine
    path = tmp_path_factory.mktemp("demo") / "train"
    train.save_to_disk(str(path))
    return path


SINGLE_PROCESS = "conf/accelerate/cpu_single_process.yaml"


def demo_config(tmp_path: Path, base_model: Path, data: Path, sft: dict, method: dict):
    (tmp_path / "final").mkdir(parents=True)
    return trainer_run_config(
        base_model=base_model,
        train_dataset=data,
        image_root=SHAPES,
        output_dir=tmp_path / "out",
        final_dir=tmp_path / "final",
        sft={
            "seed": 0,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "dataloader_pin_memory": False,
            "accelerate_config": SINGLE_PROCESS,
            **sft,
        },
        method=method,
    )


def demo_trainer(tmp_path: Path, base_model: Path, data: Path, sft: dict, method: dict):
    from vlm_pipeline.training.trainer import build_trainer

    return build_trainer(demo_config(tmp_path, base_model, data, sft, method))


@pytest.mark.slow
def test_the_demo_at_learning_rate_0_99_stops_as_diverged_and_trains_on_without_the_check(
    tmp_path, tiny_models, demo_data
):
    from vlm_pipeline.training.launcher import TrainingLaunchError, launch, launch_command, write_run_config

    method = {**DEMO_METHOD, "learning_rate": 0.99}
    # Padded rows: at this learning rate the loss is chaotic, and the float rounding that packing changes (the same
    # sums in another order) left a packed run's step-10 mean at 2.92 times the first 3 steps', under the check's 3.
    sft = {"max_steps": 10, "save_steps": 5, "padding_free": False}
    # Launched as the training stage launches it: the error the stage raises says why, first, in one line.
    config = demo_config(tmp_path / "checked", tiny_models["qwen2_5_vl"], demo_data, sft, method)
    with pytest.raises(TrainingLaunchError) as stopped:
        launch(launch_command(PROJECT_ROOT / SINGLE_PROCESS, write_run_config(config, tmp_path / "run_config.json")))
    assert re.fullmatch(
        r"training stopped at optimizer step 10: the loss diverged: the mean training loss of the last 10 optimizer "
        r"steps is [\d.]+, above 3 times the mean of the first 3 \([\d.]+\), at a learning rate of [\d.]+ at this "
        r"step \(peak 0.99\); the newest checkpoint, \S+/checkpoint-5, was written before it\. .*",
        str(stopped.value).splitlines()[0],
    )
    assert str(stopped.value).splitlines()[1].startswith("(exit code 1: ")

    unchecked = {**sft, "divergence_check": False}
    trainer = demo_trainer(tmp_path / "unchecked", tiny_models["qwen2_5_vl"], demo_data, unchecked, method)
    trainer.train()
    assert trainer.state.global_step == 10
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses) / 10 > 3 * sum(losses[:3]) / 3  # the same divergence, trained through


def components_run(tmp_path, base_model, data):
    """LoRA in every component over the frozen base (vision tower included), with gradient checkpointing."""
    sft = {
        "max_steps": 3,
        "save_steps": 100,
        "warmup_steps": 0,
        "lr_scheduler_type": "linear",
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }
    method = {
        "learning_rate": 1e-3,
        "learning_rates": {"vision_tower": 2e-4, "projector": 5e-4},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": EVERY_COMPONENT, "modules_to_save": ["lm_head"]},
    }
    return demo_trainer(tmp_path, base_model, data, sft, method)


@pytest.mark.slow
def test_a_frozen_tower_with_checkpointing_trains_every_adapter_at_its_component_s_rate(
    tmp_path, tiny_models, demo_data
):
    from vlm_pipeline.training.param_groups import optimizer_groups

    trainer = components_run(tmp_path, tiny_models["qwen2_5_vl"], demo_data)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "visual" in n and "lora_" not in n)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    groups = ("vision_tower.lora", "projector.lora", "language_model.lora", "language_model")
    rates = {"language_model": 1e-3, "vision_tower": 2e-4, "projector": 5e-4}
    for entry in logged:
        norms = [entry[f"grad_norm/{group}"] for group in groups]
        assert all(math.isfinite(norm) and norm > 0 for norm in norms), entry
        # Measured before clipping: together they are the Trainer's (pre-clip) gradient norm.
        assert math.sqrt(sum(norm**2 for norm in norms)) == pytest.approx(entry["grad_norm"], rel=1e-4)
        factor = entry["learning_rate"] / 1e-3  # the schedule's factor at this step (linear, no warm-up)
        for component, rate in rates.items():
            assert entry[f"learning_rate/{component}"] == pytest.approx(rate * factor)
    assert [entry["learning_rate"] for entry in logged] == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    read_back = optimizer_groups(trainer.optimizer)
    assert {(g["component"], g["initial_lr"]) for g in read_back} == set(rates.items())


@pytest.mark.slow
def test_a_component_that_gets_no_gradient_stops_the_run_naming_it_and_the_cause(tmp_path, tiny_models, demo_data):
    from vlm_pipeline.training.component_gradients import UntrainedComponentError

    # A projector whose output layer is zero (as a fresh projector initialised at zero would be): the vision tower's
    # output reaches the loss only through a zero factor, so its adapters' gradient is exactly zero, while the
    # projector's own output layer still gets one.
    base = tmp_path / "zero_projector"
    shutil.copytree(tiny_models["qwen2_5_vl"], base)
    model = load_model(base)
    with torch.no_grad():
        model.model.visual.merger.mlp[2].weight.zero_()
        model.model.visual.merger.mlp[2].bias.zero_()
    model.save_pretrained(base, safe_serialization=True)

    trainer = components_run(tmp_path / "run", base, demo_data)
    with pytest.raises(
        UntrainedComponentError,
        match=r"optimizer step 1: the vision_tower.lora \(\d+ trainable parameters\) got no gradient although this "
        r"step gave it input\. Likely cause: their output reaches the loss only through a zero factor",
    ):
        trainer.train()
    assert trainer.state.global_step == 0  # stopped before the optimizer applied anything
    assert trainer.component_gradients.norms["projector.lora"] > 0
