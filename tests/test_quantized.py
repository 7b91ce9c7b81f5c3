"""LoRA over a quantized base with real bitsandbytes on the CPU: QLoRA (NF4, double quantization) and 8-bit.

The tiny models are trained through the project's own trainer module (``vlm_pipeline.training.trainer.run``)
with a run config from the launcher, as the Kedro training node does.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import copy_project, run_data_stages, trainer_run_config
from safetensors.torch import load_file

from vlm_pipeline.training.trainer import build_trainer, run

pytestmark = pytest.mark.slow  # Kedro sessions, subprocesses or training runs: `make test` only

QLORA = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """Training splits for the tiny Llama (alpaca) and Qwen2.5-VL (shapes), from the project's data stages."""
    splits = {}
    for arch, env in (("llama", "tiny_llama"), ("qwen2_5_vl", "base")):
        project = copy_project(tmp_path_factory.mktemp(arch) / "project")
        params = {"base_model": str(tiny_models[arch]), "preprocessing": {"validation_fraction": 0.1}}
        splits[arch] = run_data_stages(project, env, **params)
    return splits


def run_config(tmp_path, base_model, data: Path, quantization: dict, **sft) -> dict:
    sft = {
        "seed": 0,
        "max_steps": 8,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_steps": 4,
        "learning_rate": None,
        "dataloader_pin_memory": False,
        **sft,
    }
    sft.pop("learning_rate")
    method = {
        "learning_rate": 5e-3,
        "quantization": quantization,
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    }
    final = tmp_path / "final"
    final.mkdir()
    return trainer_run_config(
        base_model=base_model,
        train_dataset=data / "train",
        eval_dataset=data / "validation",
        image_root=data.parents[1],  # the project copy: validated image paths are relative to it
        output_dir=tmp_path,
        final_dir=final,
        sft=sft,
        method=method,
    )


def test_qlora_gradients_reach_the_adapters_and_the_loss_falls(tmp_path, tiny_models, tokenized):
    # Evaluation every 2 steps puts eval-mode forwards between training steps: on CPUs with AVX512-BF16 a
    # careless setup stops LoRA gradients after the first one, which the checkpoint comparison below catches.
    config = run_config(
        tmp_path,
        tiny_models["llama"],
        tokenized["llama"],
        QLORA,
        eval_strategy="steps",
        eval_steps=2,
        padding_free=True,
    )
    trainer = build_trainer(config)
    linears = [m for n, m in trainer.model.named_modules() if n.endswith("self_attn.q_proj.base_layer")]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert linears[0].weight.quant_state.nested  # double quantization
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch).backward()
    lora_grads = [p.grad for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)
    trainer.model.zero_grad()

    run(config)
    history = json.loads((tmp_path / "final/training_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert any("eval_loss" in entry for entry in history)
    checkpoints = next((tmp_path / "checkpoints").iterdir())
    midway = load_file(checkpoints / "checkpoint-4/adapter_model.safetensors")
    final = load_file(tmp_path / "final/adapter_model.safetensors")
    changed = [name for name in final if "lora_B" in name and not torch.equal(final[name], midway[name])]
    assert changed, "the adapters stopped learning after an evaluation"


def test_8bit_lora_trains(tmp_path, tiny_models, tokenized):
    config = run_config(
        tmp_path,
        tiny_models["llama"],
        tokenized["llama"],
        {"load_in_8bit": True},
        padding_free=True,
    )
    run(config)
    adapter = load_file(tmp_path / "final/adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at zero


def test_qlora_on_a_vlm_keeps_the_vision_tower_unquantized(tmp_path, tiny_models, tokenized):
    config = run_config(tmp_path, tiny_models["qwen2_5_vl"], tokenized["qwen2_5_vl"], QLORA, max_steps=3)
    trainer = build_trainer(config)
    modules = dict(trainer.model.named_modules())
    vision = [m for n, m in modules.items() if ".visual." in n and isinstance(m, torch.nn.Linear)]
    language = [m for n, m in modules.items() if ".language_model." in n and n.endswith("mlp.up_proj")]
    assert vision and not any(isinstance(m, bnb.nn.Linear4bit) for m in vision)
    assert language and all(isinstance(m, bnb.nn.Linear4bit) for m in language)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
