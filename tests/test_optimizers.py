"""The optimizers and schedules users pick (the seeds' list), each really built and stepped by our trainer."""

from __future__ import annotations

import pytest
from conftest import PROJECT_ROOT, copy_project, run_data_stages, trainer_run_config

from vlm_pipeline.training.trainer import build_trainer

pytestmark = pytest.mark.slow  # Kedro sessions, subprocesses or training runs: `make test` only

STEPS = 8


@pytest.fixture(scope="module")
def text_train(tmp_path_factory, tiny_models):
    project = copy_project(tmp_path_factory.mktemp("optimizers") / "project")
    return run_data_stages(project, "tiny_llama", base_model=str(tiny_models["llama"])) / "train"


def trainer_for(tmp_path, tiny_models, text_train, **sft):
    sft = {
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "dataloader_pin_memory": False,
        **sft,
    }
    (tmp_path / "final").mkdir()
    config = trainer_run_config(
        base_model=tiny_models["llama"],
        train_dataset=text_train,
        image_root=PROJECT_ROOT / "data/01_raw",
        output_dir=tmp_path,
        final_dir=tmp_path / "final",
        sft=sft,
        method={"learning_rate": 1e-3},
    )
    return build_trainer(config)


@pytest.mark.parametrize(
    ("optim", "module", "name"),
    [
        ("adamw_torch_fused", "torch.optim", "AdamW"),
        ("adamw_torch", "torch.optim", "AdamW"),
        ("adamw_8bit", "bitsandbytes.optim", "AdamW"),
        ("paged_adamw_32bit", "bitsandbytes.optim", "AdamW"),
        ("paged_adamw_8bit", "bitsandbytes.optim", "AdamW"),
        ("adafactor", "transformers.optimization", "Adafactor"),
    ],
)
def test_optimizer_is_the_one_named_and_trains(optim, module, name, tmp_path, tiny_models, text_train):
    trainer = trainer_for(tmp_path, tiny_models, text_train, optim=optim, max_steps=3)
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate wraps it
    assert type(optimizer).__module__.startswith(module) and type(optimizer).__name__ == name
    if optim == "adamw_torch_fused":
        assert optimizer.param_groups[0]["fused"]
    if "8bit" in optim:
        assert any(
            state.get("state1") is not None and state["state1"].dtype.itemsize == 1
            for state in optimizer.state.values()
        )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant_with_warmup", "constant"])
@pytest.mark.parametrize("warmup", [2, 0.25])  # steps, or a share of all steps (2 of 8 either way)
def test_schedules_with_warmup_by_steps_or_ratio(schedule, warmup, tmp_path, tiny_models, text_train):
    trainer = trainer_for(tmp_path, tiny_models, text_train, lr_scheduler_type=schedule, warmup_steps=warmup)
    trainer.create_optimizer_and_scheduler(num_training_steps=STEPS)
    rates = []
    for _ in range(STEPS):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    if schedule == "constant":  # ignores warm-up (the schema warns about it)
        assert rates == [1e-3] * STEPS
        return
    assert rates[0] == 0.0 and rates[1] == pytest.approx(5e-4) and rates[2] == pytest.approx(1e-3)  # 2 warm-up steps
    if schedule == "constant_with_warmup":
        assert rates[2:] == [pytest.approx(1e-3)] * (STEPS - 2)
    else:
        assert all(later < earlier for earlier, later in zip(rates[2:], rates[3:], strict=False))
