"""A NaN loss or an infinite gradient norm is a failure: the run stops at the step where it appears, before the
optimizer applies it, and the checkpoints written before it stay the newest ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, trainer_run_config
from datasets import Dataset

from vlm_pipeline.architectures import load_model
from vlm_pipeline.data.encoding import IGNORE_INDEX
from vlm_pipeline.training.checkpoints import last_complete_checkpoint
from vlm_pipeline.training.trainer import NonFiniteTrainingError, build_trainer

pytestmark = pytest.mark.slow  # Kedro sessions, subprocesses or training runs: `make test` only

POISON = 7  # a token id only the third row contains


def assert_weights_are_the_checkpoints(model: torch.nn.Module, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights in memory when the run stopped are those saved after the last good step: the bad step's
    update was never applied (an applied one moves every weight, through Adam's momentum if not its gradient).
    Returns the checkpoint's weights."""
    saved = load_model(checkpoint).state_dict()
    in_memory = model.state_dict()
    assert set(in_memory) == set(saved)
    changed = [name for name, tensor in in_memory.items() if not torch.equal(tensor, saved[name])]
    assert not changed, f"{len(changed)} tensors differ from {checkpoint.name}, e.g. {changed[:3]}"
    return saved


def test_a_non_finite_gradient_norm_then_loss_stop_the_run_before_the_optimizer_step(tiny_models, tmp_path):
    # The base model with one embedding row at infinity: any row holding that token gives a NaN loss.
    base = tmp_path / "poisoned"
    shutil.copytree(tiny_models["llama"], base)
    model = load_model(base)
    with torch.no_grad():
        model.get_input_embeddings().weight[POISON] = float("inf")
    model.save_pretrained(base, safe_serialization=True)

    rows = []
    for step in range(4):
        ids = [20 + step, 30, 40, 50, 60, 70] + ([POISON] if step == 2 else [80])
        rows.append(
            {
                "input_ids": ids,
                "labels": [IGNORE_INDEX] * 3 + ids[3:],
                "image_paths": [],
                "source_line": step + 1,
                "length": len(ids),
            }
        )
    Dataset.from_list(rows).save_to_disk(tmp_path / "train")

    sft = {
        "max_steps": 4,
        "per_device_train_batch_size": 1,
        "train_sampling_strategy": "sequential",
        "save_steps": 1,
        "save_total_limit": None,
        "logging_steps": 1,
        "dataloader_pin_memory": False,
    }
    (tmp_path / "final").mkdir()
    config = trainer_run_config(
        base_model=base,
        train_dataset=tmp_path / "train",
        image_root=PROJECT_ROOT / "data/01_raw",
        output_dir=tmp_path / "out",
        final_dir=tmp_path / "final",
        sft=sft,
        method={"learning_rate": 1e-3},
    )
    checkpoints = tmp_path / "out" / "checkpoints"

    # Step 2's loss is finite, but one weight's gradient is made infinite on its way back: the gradient norm is.
    trainer = build_trainer(config)
    weight = trainer.model.get_decoder().layers[0].mlp.down_proj.weight
    weight.register_hook(lambda grad: torch.full_like(grad, float("inf")) if trainer.state.global_step == 1 else grad)
    with pytest.raises(NonFiniteTrainingError, match=r"optimizer step 2: the gradient norm is inf.*checkpoint-1"):
        trainer.train()
    newest = last_complete_checkpoint(next(checkpoints.iterdir()))
    assert newest is not None and newest.name == "checkpoint-1"
    assert_weights_are_the_checkpoints(trainer.model, newest)

    # Resumed from there without the hook, step 2 passes and step 3's row gives a NaN loss.
    trainer = build_trainer(config)
    with pytest.raises(NonFiniteTrainingError, match=r"optimizer step 3: the loss is nan.*checkpoint-2"):
        trainer.train(resume_from_checkpoint=str(newest))
    newest = last_complete_checkpoint(next(checkpoints.iterdir()))
    assert newest is not None and newest.name == "checkpoint-2"
    saved = assert_weights_are_the_checkpoints(trainer.model, newest)
    assert all(torch.isfinite(tensor).all() for name, tensor in saved.items() if "embed_tokens" not in name)
