"""The ``model`` parameter group (TRL ModelConfig names): load dtype and attention kernel, the seeds' older
names, a missing flash-attn package caught before loading, and LoRA's float32 adapters over a bf16 base."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from conftest import PROJECT_ROOT, trainer_run_config
from test_config import load_params

from vlm_pipeline.config import ConfigError, check_parameters, validate_parameters
from vlm_pipeline.training.trainer import build_trainer


def test_seed_names_map_to_todays_with_a_warning(caplog):
    params = load_params()
    with caplog.at_level(logging.WARNING):
        parsed = validate_parameters({**params, "model": {"torch_dtype": "bfloat16", "attn_implementation": "flash"}})
    assert parsed.model.dtype == "bfloat16" and parsed.model.attn_implementation == "flash_attention_2"
    assert "torch_dtype is an older name" in caplog.text and "flash is an older name" in caplog.text


def test_bad_values_name_the_key():
    params = load_params()
    with pytest.raises(ConfigError, match=r"model.dtype: .*'bfloat16'"):
        validate_parameters({**params, "model": {"dtype": "bfloat61"}})
    with pytest.raises(ConfigError, match="runs in bfloat16 or float16, not float32"):
        validate_parameters({**params, "model": {"dtype": "float32", "attn_implementation": "flash_attention_2"}})


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_its_package_stops_before_any_model_loads(monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)
    params = {**load_params(), "model": {"dtype": "bfloat16", "attn_implementation": "flash_attention_2"}}
    with pytest.raises(ConfigError, match="needs the flash_attn package, which is not installed"):
        check_parameters(params, PROJECT_ROOT)


@pytest.mark.slow
def test_lora_over_a_bf16_base_trains_float32_adapters(tiny_models, tmp_path):
    from datasets import Dataset

    rows = [
        {
            "input_ids": [20, 30, 40, 50],
            "labels": [-100, -100, 40, 50],
            "image_paths": [],
            "source_line": 1,
            "length": 4,
        }
    ] * 4
    Dataset.from_list(rows).save_to_disk(tmp_path / "train")
    (tmp_path / "final").mkdir()
    config = trainer_run_config(
        base_model=tiny_models["llama"],
        train_dataset=tmp_path / "train",
        image_root=tmp_path,
        output_dir=tmp_path / "out",
        final_dir=tmp_path / "final",
        model={"dtype": "bfloat16"},
        sft={"max_steps": 1, "per_device_train_batch_size": 2, "bf16": True, "dataloader_pin_memory": False},
        method={"learning_rate": 1e-3, "lora": {"r": 4, "lora_alpha": 8}},
    )
    trainer = build_trainer(config)
    trained = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    frozen_linear = {m.base_layer.weight.dtype for m in trainer.model.modules() if hasattr(m, "base_layer")}
    assert trained == {torch.float32} and frozen_linear == {torch.bfloat16}
    trainer.train()
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
