"""A vision dataset that mixes text-only and image rows trains without error: batches are one modality each."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT, run_context, trainer_run_config

from vlm_pipeline.architectures import get_architecture, load_model, load_processor
from vlm_pipeline.config.schema import PreprocessingParams
from vlm_pipeline.data.validation import validate_lines
from vlm_pipeline.pipelines.preprocessing.nodes import tokenize_split
from vlm_pipeline.training.collator import SFTCollator
from vlm_pipeline.training.launcher import write_run_config
from vlm_pipeline.training.sampler import ModalityGroupedSampler

RAW = PROJECT_ROOT / "data/01_raw"


def test_every_batch_is_one_modality_and_no_row_is_dropped():
    has_images = [i % 3 != 0 for i in range(50)]  # 33 image rows, 17 text rows
    sampler = ModalityGroupedSampler(has_images, batch_size=4, seed=7, lengths=list(range(50)))
    for _ in range(3):  # three epochs, each a different order
        order = list(sampler)
        assert len(order) == len(sampler) == 36 + 20
        assert set(order) == set(range(50))
        batches = [order[s : s + 4] for s in range(0, len(order), 4)]
        assert all(len({has_images[i] for i in batch}) == 1 for batch in batches)
    again = ModalityGroupedSampler(has_images, batch_size=4, seed=7, lengths=list(range(50)))
    assert list(again) == list(ModalityGroupedSampler(has_images, batch_size=4, seed=7, lengths=list(range(50))))


def mixed_records() -> list[dict]:
    """Image questions and text-only glossary questions, as the validation stage emits them."""
    vqa = (RAW / "shapes_vqa/train.jsonl").read_bytes().splitlines()[:10]
    text = (RAW / "alpaca_glossary/train.jsonl").read_bytes().splitlines()[:6]
    # Two files (each file has one format); both relative to shapes_vqa, as the alpaca rows have no image.
    return [
        record
        for lines in (vqa, text)
        for record in validate_lines(lines, RAW / "shapes_vqa", max_image_pixels=10**8).valid
    ]


@pytest.mark.slow
def test_mllama_trains_on_a_mixed_dataset(tmp_path, tiny_models):
    records = mixed_records()
    assert {bool(r["images"]) for r in records} == {True, False}
    params = PreprocessingParams(max_length=512)
    train, quarantine, _ = tokenize_split(records, run_context(tiny_models["mllama"], RAW / "shapes_vqa"), params)
    assert not quarantine
    # Why the sampler matters: one batch with both kinds of row does not run on Mllama.
    mixed = [next(r for r in train if r["image_paths"]), next(r for r in train if not r["image_paths"])]
    collator = SFTCollator(load_processor(tiny_models["mllama"]), get_architecture("mllama"), RAW / "shapes_vqa")
    with pytest.raises(RuntimeError):
        load_model(tiny_models["mllama"])(**collator(mixed))
    train.save_to_disk(str(tmp_path / "train"))

    sft = {
        "seed": 0,
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_steps": 100,
        "bf16": False,
        "dataloader_pin_memory": False,
        "train_sampling_strategy": "group_by_length",
    }
    method = {
        "learning_rate": 1e-3,
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    }
    (tmp_path / "final").mkdir()
    config = trainer_run_config(
        base_model=tiny_models["mllama"],
        train_dataset=tmp_path / "train",
        image_root=RAW / "shapes_vqa",
        output_dir=tmp_path / "run",
        final_dir=tmp_path / "final",
        sft=sft,
        method=method,
    )
    write_run_config(config, tmp_path / "config.json")
    result = subprocess.run(
        [sys.executable, "-m", "vlm_pipeline.training.trainer", "--config", str(tmp_path / "config.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "final/training_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
