"""A NaN loss is a failure: the run stops at the step where it appears, before the optimizer applies it, and
the checkpoints written before it stay the newest ones."""

from __future__ import annotations

import shutil

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


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoints_before_it(tiny_models, tmp_path):
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
    trainer = build_trainer(config)
    with pytest.raises(NonFiniteTrainingError, match=r"optimizer step 3: the loss is nan.*checkpoint-2"):
        trainer.train()
    checkpoints = tmp_path / "out" / "checkpoints"
    newest = last_complete_checkpoint(next(checkpoints.iterdir()))
    assert newest is not None and newest.name == "checkpoint-2"
    saved = load_model(newest)
    assert all(torch.isfinite(p).all() for name, p in saved.named_parameters() if "embed_tokens" not in name)
