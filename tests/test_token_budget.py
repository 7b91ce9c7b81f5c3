"""``sft.max_tokens_per_batch``: micro-batches that hold as many records as fit a token budget.

The partition (``training/token_budget.py``) on random sets, as accelerate deals it out to the ranks: every row
once, every micro-batch within the budget, one modality per micro-batch and per micro-step of all ranks, the same
micro-batches every epoch in another order. The errors it raises; the planner counting the same micro-batches and
sizing activations from the budget; the schema's check against ``preprocessing.max_length``. On the tiny
Qwen2.5-VL: one optimizer step over two micro-batches of very different token counts gives the gradient of the same
records in one batch (a token mean over the whole step), and two DDP processes on CPU train a mixed set in the
steps the plan predicts.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader, skip_first_batches
from conftest import PROJECT_ROOT, launched_run_config, run_context, trainer_run_config
from datasets import Dataset, load_from_disk
from test_mixed_modality import RAW, mixed_records
from test_mixed_ranks import run_launched
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from vlm_pipeline.config.schema import (
    ConfigError,
    MethodParams,
    PreprocessingParams,
    SFTParams,
    validate_parameters,
)
from vlm_pipeline.planning.memory import GIB, MemorySettings, estimate_memory
from vlm_pipeline.planning.model_shape import read_model_shape
from vlm_pipeline.planning.plan import build_plan, training_data
from vlm_pipeline.reporting.tables import format_plan
from vlm_pipeline.training.sampler import index_sampler
from vlm_pipeline.training.token_budget import TokenBudgetBatchSampler, micro_batches

BUDGET = 256
MODEL_CONFIGS = PROJECT_ROOT / "conf/model_configs"


def random_rows(seed: int, rows: int = 120) -> tuple[list[int], list[bool]]:
    """Lengths up to most of the budget, and a share of image rows that varies with the seed (each modality at
    least 3 rows, so that every world size here has rows of each modality for each rank)."""
    rng = random.Random(seed)
    share = [0.1, 0.5, 0.9][seed % 3]
    lengths = [rng.randint(8, 200) for _ in range(rows)]
    has_images = [rng.random() < share for _ in range(rows)]
    assert 3 <= sum(has_images) <= rows - 3
    return lengths, has_images


def tokens(lengths: list[int], packed: bool) -> int:
    """What a micro-batch of rows with these lengths costs as the collator lays it out: one packed row of them all,
    or a row each padded to the longest."""
    return sum(lengths) if packed else len(lengths) * max(lengths)


def rank_batches(
    lengths: list[int], has_images: list[bool], world_size: int, packed: bool, seed: int = 0, epoch: int = 0
) -> list[list[list[int]]]:
    """Each rank's micro-batches of one epoch as accelerate's ``BatchSamplerShard`` deals them (batch ``k`` to rank
    ``k % world_size``); each rank builds its own sampler, as each process does."""
    ranks = []
    for rank in range(world_size):
        sampler = TokenBudgetBatchSampler(lengths, has_images, BUDGET, seed, world_size, packed)
        sampler.set_epoch(epoch)
        ranks.append(list(BatchSamplerShard(sampler, world_size, rank)))
    return ranks


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("data_seed", [0, 1, 2, 3, 4, 5])
def test_every_row_once_within_the_budget_one_modality_per_micro_step(data_seed, world_size, packed):
    lengths, has_images = random_rows(data_seed)
    partition = micro_batches(lengths, has_images, BUDGET, world_size, packed)
    assert len(partition) % world_size == 0
    orders = []
    for epoch in range(3):
        ranks = rank_batches(lengths, has_images, world_size, packed, seed=7, epoch=epoch)
        assert {len(rank) for rank in ranks} == {len(partition) // world_size}  # no rank tops up or runs short
        trained = Counter(i for rank in ranks for batch in rank for i in batch)
        assert trained == Counter(range(len(lengths)))  # every row once: nothing dropped, nothing repeated
        assert all(tokens([lengths[i] for i in batch], packed) <= BUDGET for rank in ranks for batch in rank)
        for step in zip(*ranks, strict=True):  # one micro-step of all ranks: a single modality
            assert len({has_images[i] for batch in step for i in batch}) == 1
        # The same micro-batches every epoch (so the step count is known up front); only their order changes.
        assert {frozenset(b) for rank in ranks for b in rank} == {frozenset(b) for b in partition}
        orders.append([tuple(batch) for batch in ranks[0]])
    assert orders[0] != orders[1] != orders[2]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_micro_batches_are_length_grouped_within_a_modality(packed):
    """Each micro-batch is a run of its modality's rows sorted by length: padded, it wastes little on padding."""
    lengths, has_images = random_rows(1)
    partition = micro_batches(lengths, has_images, BUDGET, 2, packed)
    for flag in (True, False):
        ranges = sorted(
            (min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in partition if has_images[b[0]] == flag
        )
        assert all(high <= next_low for (_, high), (next_low, _) in zip(ranges, ranges[1:], strict=False))
    padded = micro_batches(lengths, has_images, BUDGET, 2, packed=False)
    pad = sum(tokens([lengths[i] for i in b], False) - sum(lengths[i] for i in b) for b in padded)
    assert pad < 0.05 * sum(lengths)


def test_the_order_is_deterministic_per_seed_and_epoch():
    lengths, has_images = random_rows(2)

    def order(seed: int, epoch: int) -> list[list[int]]:
        sampler = TokenBudgetBatchSampler(lengths, has_images, BUDGET, seed, 2)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(3, 0) == order(3, 0) and order(3, 1) == order(3, 1)
    assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)
    # Without set_epoch, each pass moves on to the next epoch; set_epoch (what the Trainer calls) agrees with it.
    sampler = TokenBudgetBatchSampler(lengths, has_images, BUDGET, 3, 2)
    assert [list(sampler) for _ in range(3)] == [order(3, epoch) for epoch in range(3)]
    # No batch_size: accelerate's BatchSamplerShard then takes micro-batches of any size as they come.
    assert not hasattr(sampler, "batch_size")


def test_a_modality_s_micro_batches_are_split_to_a_multiple_of_the_world_size():
    # Five short image rows fit one micro-batch and three text rows another; three processes need three of each:
    # the micro-batch with the most rows is halved until there are.
    lengths, has_images = [10] * 5 + [20, 30, 40], [True] * 5 + [False] * 3
    assert micro_batches(lengths, has_images, BUDGET) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert micro_batches(lengths, has_images, BUDGET, 3) == [[0, 1], [2], [3, 4], [5], [6], [7]]


def one_line_error(*args, **kwargs) -> str:
    with pytest.raises(ValueError) as raised:
        micro_batches(*args, **kwargs)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_what_cannot_be_partitioned_is_refused_in_one_line_naming_the_counts():
    # A row over the budget fits nowhere (preprocessing sets such records aside at max_length).
    message = one_line_error([10, 300, 20, 400], [False] * 4, BUDGET)
    assert message.startswith("row 1 has 300 tokens (and 1 more), over sft.max_tokens_per_batch 256")
    # One text row cannot give each of two processes a text micro-batch at the same step.
    message = one_line_error([10] * 5, [True] * 4 + [False], BUDGET, world_size=2)
    assert message.startswith("1 text-only row(s) for 2 processes") and "fewer processes" in message
    # Three image rows that each fill a micro-batch cannot be dealt to two processes without repeating one.
    message = one_line_error([200] * 3, [True] * 3, BUDGET, world_size=2)
    assert "the 3 image rows each fill a micro-batch" in message and "raise sft.max_tokens_per_batch" in message
    assert len(micro_batches([200] * 3, [True] * 3, BUDGET, world_size=3)) == 3


def test_the_epoch_reaches_the_sampler_under_accelerate_s_wrappers():
    """A mid-epoch resume wraps the prepared loader's ``BatchSamplerShard`` in ``SkipBatchSampler``; the trainer
    sets the epoch on what ``index_sampler`` finds below them, which must be the token-budget sampler."""
    lengths, has_images = random_rows(0, rows=40)
    sampler = TokenBudgetBatchSampler(lengths, has_images, BUDGET, 0, world_size=2)
    loader = DataLoader(list(range(40)), batch_sampler=sampler)
    prepared = prepare_data_loader(loader, num_processes=2, process_index=1, put_on_device=False)
    resumed = skip_first_batches(prepared, 1)
    assert index_sampler(loader) is sampler and index_sampler(prepared) is sampler
    assert index_sampler(resumed) is sampler
    index_sampler(resumed).set_epoch(2)
    expected = [list(batch) for batch in rank_batches(lengths, has_images, 2, False, epoch=2)[1]]
    assert [batch.tolist() for batch in resumed] == expected[1:]


# --- the plan ------------------------------------------------------------------------------------------------


def accelerate_file(folder: Path, world_size: int) -> str:
    path = folder / f"world_{world_size}.yaml"
    kind = "MULTI_GPU" if world_size > 1 else "NO"
    path.write_text(yaml.safe_dump({"distributed_type": kind, "num_processes": world_size}))
    return str(path)


@pytest.mark.parametrize(
    ("model", "padding_free", "layout"),
    [
        ("qwen2.5-vl-7b-instruct", None, "packed"),  # the family packs
        ("qwen2.5-vl-7b-instruct", False, "padded"),
        ("llama-3.2-11b-vision-instruct", None, "padded"),  # Mllama cannot pack
    ],
)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_plan_counts_the_sampler_s_micro_batches(tmp_path, world_size, model, padding_free, layout):
    lengths, has_images = random_rows(world_size)
    data = Dataset.from_dict({"length": lengths, "image_paths": [["a.png"] if f else [] for f in has_images]})
    sft = SFTParams(
        accelerate_config=accelerate_file(tmp_path, world_size),
        max_tokens_per_batch=BUDGET,
        padding_free=padding_free,
        gradient_accumulation_steps=3,
        num_train_epochs=2,
    )
    method = MethodParams(learning_rate=1e-4, lora={"r": 4, "target_modules": ["q_proj"]})
    plan = build_plan(
        model_dir=MODEL_CONFIGS / model, sft=sft, method=method, images={}, **training_data(data), max_length=200
    )
    assert plan["token_budget"]["layout"] == layout
    packed = layout == "packed"
    # What each process's DataLoader holds: the sampler as accelerate shards it.
    sampler = TokenBudgetBatchSampler(lengths, has_images, BUDGET, sft.seed, world_size, packed)
    per_rank = {len(BatchSamplerShard(sampler, world_size, rank)) for rank in range(world_size)}
    steps = plan["steps"]
    assert per_rank == {steps["batches_per_epoch"]} and plan["token_budget"]["micro_batches"] == len(sampler)
    assert steps["steps_per_epoch"] == math.ceil(steps["batches_per_epoch"] / 3)
    assert steps["total_steps"] == 2 * steps["steps_per_epoch"] and steps["repeated_rows"] == 0
    assert steps["effective_batch"] == pytest.approx(len(lengths) * 3 / steps["batches_per_epoch"], abs=0.05)
    # The vision tower's batch in the memory estimate: the most rows of a micro-batch with images.
    assert plan["settings"]["batch_size"] == max(len(b) for b in sampler.batches if has_images[b[0]])
    printed = format_plan(plan)
    assert f"micro-batches of at most {BUDGET} tokens ({layout};" in printed
    assert f"{len(sampler)} an epoch) × {world_size} × 3 accumulation" in printed


def test_the_memory_estimate_sizes_activations_from_the_budget():
    """Llama 3.1 8B (text): a budget of 4,096 tokens has the activations of 8 rows × 512 tokens, whatever
    per_device_train_batch_size and the rows say (13 of 300 tokens fill a micro-batch here); over the GPU, the plan
    suggests halving the budget, not the rows."""
    llama = MODEL_CONFIGS / "llama-3.1-8b-instruct"
    full = MethodParams(learning_rate=1e-5)
    lora = MethodParams(learning_rate=1e-4, lora={"r": 16, "target_modules": ["q_proj", "v_proj"]})

    def plan(method: MethodParams, gpu_memory_gb: float | None = None, **sft) -> dict:
        accelerate = str(PROJECT_ROOT / "conf/accelerate/single_gpu.yaml")
        params = SFTParams(accelerate_config=accelerate, per_device_train_batch_size=1, bf16=True, **sft)
        return build_plan(
            model_dir=llama,
            sft=params,
            method=method,
            images={},
            records=64,
            lengths=[300] * 64,
            max_length=512,
            gpu_memory_gb=gpu_memory_gb,
        )

    budgeted = plan(full, max_tokens_per_batch=4096)
    assert budgeted["settings"]["tokens_per_batch"] == 4096
    rows = MemorySettings(**{**budgeted["settings"], "tokens_per_batch": None, "batch_size": 8, "seq_len": 512})
    for term in ("activations", "logits_and_loss"):
        expected = estimate_memory(read_model_shape(llama, full), rows)[term]
        assert budgeted["memory_gib"][term] * GIB == pytest.approx(expected)

    # LoRA with checkpointing at 32,768 tokens a micro-batch does not fit 24 GB: halving the budget comes first.
    over = plan(lora, 24, max_tokens_per_batch=32768, gradient_checkpointing=True)
    halved = "sft.max_tokens_per_batch halved, gradient_accumulation_steps doubled"
    assert over["alternatives"][0]["change"] == halved
    assert not any("per_device_train_batch_size" in option["change"] for option in over["alternatives"])
    # A budget at max_length cannot be halved: it would no longer hold the longest record.
    at_max_length = plan(lora, 4, max_tokens_per_batch=512, gradient_checkpointing=True)
    assert halved not in [option["change"] for option in at_max_length["alternatives"]]


def test_the_schema_refuses_a_budget_below_max_length_in_one_line():
    params = {"raw_data": "data/01_raw/shapes_vqa", "base_model": "data/00_base_models/tiny-qwen2_5_vl"}
    with pytest.raises(ConfigError) as raised:
        validate_parameters({**params, "preprocessing": {"max_length": 512}, "sft": {"max_tokens_per_batch": 511}})
    assert str(raised.value).startswith("sft.max_tokens_per_batch 511 is below preprocessing.max_length 512: ")
    assert "\n" not in str(raised.value)
    at_max_length = validate_parameters({**params, "sft": {"max_tokens_per_batch": 512}})
    assert at_max_length.sft.max_tokens_per_batch == 512
    assert "max_tokens_per_batch" not in at_max_length.sft.trainer_args()  # ours, not an SFTConfig field


# --- the tiny Qwen2.5-VL -------------------------------------------------------------------------------------

SHAPES = RAW / "shapes_vqa"
MAX_LENGTH = 64  # every mixed record is shorter


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory, tiny_models) -> Path:
    """10 image questions (2-4 trained tokens each) and 6 text-only ones (13-24), for the tiny Qwen2.5-VL."""
    from vlm_pipeline.pipelines.preprocessing.nodes import tokenize_split

    context = run_context(tiny_models["qwen2_5_vl"], SHAPES)
    train, quarantine, _ = tokenize_split(mixed_records(), context, PreprocessingParams(max_length=MAX_LENGTH))
    assert not quarantine and sum(bool(paths) for paths in train["image_paths"]) == 10
    path = tmp_path_factory.mktemp("token_budget") / "train"
    train.save_to_disk(str(path))
    return path


class GradientsAtTheStep(TrainerCallback):
    """Every trainable parameter's gradient as the optimizer takes it (after accumulation and clipping)."""

    def __init__(self):
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        named = model.named_parameters()
        self.gradients.append({name: p.grad.detach().clone() for name, p in named if p.requires_grad})


LEARNING_RATE = 0.5


@pytest.mark.slow
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_one_step_over_micro_batches_of_unequal_tokens_is_the_step_over_one_batch(
    tmp_path, tiny_models, mixed_data, padding_free
):
    """fp32 full fine-tuning with plain SGD (no momentum, weight decay, clipping or warm-up): a budget of 400 tokens,
    padded or packed, cuts the 16 records into the 10 image rows (30 trained tokens) and the 6 text rows (113), one
    optimizer step of two accumulated micro-batches. Its gradient, and so the update, is that of all 16 records in
    one batch through the model's own loss (a mean over the 143 tokens): a mean of the two micro-batches' means
    would weigh each image token almost four times as much as a text token."""
    from vlm_pipeline.architectures import architecture_for_model, load_model, load_processor
    from vlm_pipeline.training.collator import SFTCollator
    from vlm_pipeline.training.trainer import build_trainer

    base = tiny_models["qwen2_5_vl"]
    accelerate_config = str(PROJECT_ROOT / "conf/accelerate/cpu_single_process.yaml")
    sft = {
        "seed": 0,
        "num_train_epochs": 1,
        "max_tokens_per_batch": 400,
        "gradient_accumulation_steps": 2,
        "padding_free": padding_free,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "save_strategy": "no",
        "logging_steps": 1,
        "dataloader_pin_memory": False,
        "accelerate_config": accelerate_config,
    }
    (tmp_path / "final").mkdir()
    config = trainer_run_config(
        base_model=base,
        train_dataset=mixed_data,
        image_root=SHAPES,
        output_dir=tmp_path / "out",
        final_dir=tmp_path / "final",
        sft=sft,
        method={"learning_rate": LEARNING_RATE},
    )
    trainer = build_trainer(config)
    gradients = GradientsAtTheStep()
    trainer.add_callback(gradients)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()

    # The step the plan predicted, over the two micro-batches it counts.
    data = load_from_disk(str(mixed_data))
    plan = build_plan(
        model_dir=base,
        sft=config.sft,
        method=config.method,
        images={},
        **training_data(data),
        max_length=MAX_LENGTH,
    )
    assert (plan["token_budget"]["micro_batches"], plan["steps"]["total_steps"]) == (2, 1)
    assert trainer.state.global_step == 1 and len(gradients.gradients) == 1
    assert len(index_sampler(trainer.get_train_dataloader()).batches) == 2  # the token-budget sampler's
    stepped = gradients.gradients[0]

    # The same records in one batch, through the model's own loss, from the same weights.
    model = load_model(base)
    model.train()
    collator = SFTCollator(load_processor(base), architecture_for_model(base), SHAPES, padding_free=False)
    model(**collator(list(data))).loss.backward()
    one_batch = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    assert stepped.keys() == one_batch.keys() == before.keys()
    for name, gradient in one_batch.items():
        difference = torch.linalg.norm(stepped[name] - gradient) / torch.linalg.norm(gradient).clamp(min=1e-30)
        assert difference <= 1e-5, f"{name}: the gradients differ by {difference:.1e} of the one batch's"
        # Plain SGD: the update is the learning rate times that gradient.
        after = dict(trainer.model.named_parameters())[name].detach()
        torch.testing.assert_close(after - before[name], -LEARNING_RATE * stepped[name], rtol=1e-4, atol=1e-6)


RESUME_AT = 3  # the first of epoch 1's two optimizer steps


@pytest.mark.slow
@pytest.mark.xdist_group("torch_distributed_ports")
def test_two_ddp_ranks_train_a_mixed_set_in_the_planned_steps_and_resume_mid_epoch_in_its_order(
    tmp_path, tiny_models, mixed_data
):
    """A budget of 128 tokens, padded: the 10 image rows fill 4 micro-batches and the 6 text rows 3, split to 4 so
    that each of the 2 ranks takes a micro-batch of one modality at every micro-step; 2 optimizer steps an epoch
    with accumulation 2, over 2 epochs: the steps the plan predicts.

    Then the run as a kill after step 3 (in epoch 1) leaves it resumes into epoch 1's order, not a replay of epoch
    0's (the trainer sets the epoch on the token-budget sampler under accelerate's wrappers): its last step trains
    the same micro-batches from the same weights as the uninterrupted run, so every logged loss is equal."""
    from vlm_pipeline.config.run import RunConfig
    from vlm_pipeline.training.launcher import launch_command

    model = tiny_models["qwen2_5_vl"]
    data = load_from_disk(str(mixed_data))
    accelerate_config = "conf/accelerate/cpu_ddp.yaml"
    sft = {"max_tokens_per_batch": 128, "padding_free": False, "gradient_accumulation_steps": 2, "num_train_epochs": 2}
    plan = build_plan(
        model_dir=model,
        sft=SFTParams(**sft, accelerate_config=str(PROJECT_ROOT / accelerate_config)),
        method=MethodParams(learning_rate=1e-3),
        images={},
        **training_data(data),
        max_length=MAX_LENGTH,
    )
    assert plan["token_budget"]["micro_batches"] == 8 and plan["steps"]["total_steps"] == 4
    # The test can fail: epoch 0's order, replayed from the resume point, would train other micro-batches.
    lengths, has_images = list(data["length"]), [bool(paths) for paths in data["image_paths"]]
    replayed, resumed = (TokenBudgetBatchSampler(lengths, has_images, 128, 0, world_size=2) for _ in range(2))
    resumed.set_epoch(1)
    skipped = (RESUME_AT - 2) * 2 * 2  # the steps of epoch 1 already taken × accumulation × ranks
    assert list(replayed)[skipped:] != list(resumed)[skipped:]

    def train() -> tuple[str, Path]:
        config = launched_run_config(
            tmp_path, model, mixed_data, SHAPES, accelerate_config, 1, save_steps=RESUME_AT, **sft
        )
        command = launch_command(str(PROJECT_ROOT / accelerate_config), config)
        return run_launched(command, timeout=300), RunConfig.read(config).checkpoint_dir

    output, checkpoints = train()
    assert "micro-batches of at most 128 tokens (padded), image and text-only rows apart: 8 an epoch" in output
    info = json.loads((tmp_path / "final/run_info.json").read_text())
    assert (info["world_size"], info["engine"]) == (2, "DistributedDataParallel")
    assert info["global_step"] == plan["steps"]["total_steps"]
    uninterrupted = losses(tmp_path / "final")
    assert len(uninterrupted) == 4 and all(math.isfinite(loss) for loss in uninterrupted)

    # As a kill after checkpoint-3 leaves it: no finished run, checkpoint-3 the newest complete checkpoint.
    for later in (checkpoints / "final", checkpoints / "checkpoint-4", tmp_path / "final"):
        shutil.rmtree(later)
    output, _ = train()
    assert f"resuming from {checkpoints / f'checkpoint-{RESUME_AT}'}" in output
    assert losses(tmp_path / "final") == pytest.approx(uninterrupted, rel=1e-4)


def losses(final: Path) -> list[float]:
    history = json.loads((final / "training_history.json").read_text())
    return [entry["loss"] for entry in history if "loss" in entry]
