"""Mixed image and text-only rows on several ranks: every micro-step of all ranks together takes one modality.

Under DeepSpeed ZeRO-3 a rank with an image batch gathers the vision tower's parameters and a rank with a text
batch does not, so ranks that disagree hang (ms-swift #9655, LLaMA-Factory #5944). The unit tests replay how the
Trainer's DataLoader and accelerate's ``BatchSamplerShard`` deal the sampler's order out to the ranks; the launched
tests train the tiny Qwen2.5-VL on two CPU processes (gloo) under DDP and ZeRO-3, and show that the order before
rank alignment (each rank's own batch one modality, nothing more) hangs under ZeRO-3.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from accelerate.data_loader import BatchSamplerShard
from conftest import PROJECT_ROOT, launched_run_config, run_context
from datasets import Dataset, load_from_disk
from test_mixed_modality import RAW, mixed_records
from torch.utils.data import BatchSampler

from vlm_pipeline.config.run import RunConfig
from vlm_pipeline.config.schema import ImageBounds, MethodParams, PreprocessingParams, SFTParams
from vlm_pipeline.data.encoding import vision_rows
from vlm_pipeline.data.validation import validate_lines
from vlm_pipeline.pipelines.preprocessing.nodes import tokenize_split
from vlm_pipeline.planning.plan import build_plan, training_data
from vlm_pipeline.planning.steps import plan_steps
from vlm_pipeline.training.launcher import launch_command
from vlm_pipeline.training.sampler import ModalityGroupedSampler

HAS_IMAGES = [i % 3 != 0 for i in range(50)]  # 33 image rows, 17 text rows


def rank_batches(
    has_images: list[bool],
    batch_size: int,
    world_size: int,
    seed: int = 0,
    lengths: list[int] | None = None,
    epoch: int = 0,
    aligned: bool = True,
) -> list[list[list[int]]]:
    """Each rank's micro-batches of one epoch, as the Trainer's DataLoader cuts the order into batches and accelerate
    hands batch ``k`` to rank ``k % world_size``; each rank builds its own sampler, as each process does.
    ``aligned=False`` is the order before rank alignment: only each rank's own batch is one modality."""
    ranks = []
    for rank in range(world_size):
        sampler = ModalityGroupedSampler(has_images, batch_size, seed, lengths, world_size if aligned else 1)
        sampler.set_epoch(epoch)
        shard = BatchSamplerShard(BatchSampler(sampler, batch_size, drop_last=False), world_size, rank)
        ranks.append(list(shard))
    return ranks


def micro_step_modalities(ranks: list[list[list[int]]], has_images: list[bool]) -> list[set[bool]]:
    """The modalities of each micro-step's rows, all ranks together."""
    return [{has_images[i] for batch in step for i in batch} for step in zip(*ranks, strict=True)]


@pytest.mark.parametrize("lengths", [None, "random"], ids=["random", "group_by_length"])
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_micro_step_of_all_ranks_is_one_modality(world_size, accumulation, lengths):
    batch = 3
    row_lengths = [(i * 37) % 101 + 5 for i in range(len(HAS_IMAGES))] if lengths else None
    sft = SFTParams(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
    plan = plan_steps(len(HAS_IMAGES), world_size, sft, vision_records=sum(HAS_IMAGES))
    for epoch in range(3):
        ranks = rank_batches(HAS_IMAGES, batch, world_size, seed=5, lengths=row_lengths, epoch=epoch)
        assert all(len(batch_rows) == batch for rank in ranks for batch_rows in rank)
        assert len({len(rank) for rank in ranks}) == 1  # every rank takes as many micro-steps
        assert all(len(modalities) == 1 for modalities in micro_step_modalities(ranks, HAS_IMAGES))
        # Optimizer steps: the Trainer takes `accumulation` micro-steps a step on every rank, the last one of an
        # epoch possibly fewer; each rank sees the same modalities in the same order within every step.
        micro_steps = len(ranks[0])
        steps = [range(s, min(s + accumulation, micro_steps)) for s in range(0, micro_steps, accumulation)]
        for step in steps:
            sequences = {tuple(HAS_IMAGES[ranks[r][m][0]] for m in step) for r in range(world_size)}
            assert len(sequences) == 1
        assert micro_steps == plan["batches_per_epoch"] and len(steps) == plan["steps_per_epoch"]
        # Every row is trained; only the last global batch of each modality repeats rows of its own modality.
        trained = Counter(i for rank in ranks for batch_rows in rank for i in batch_rows)
        assert set(trained) == set(range(len(HAS_IMAGES)))
        global_batch = batch * world_size
        fill = -sum(HAS_IMAGES) % global_batch + -HAS_IMAGES.count(False) % global_batch
        assert sum(trained.values()) - len(HAS_IMAGES) == fill == plan["repeated_rows"]
        assert max(trained.values()) <= 2


def test_order_is_deterministic_per_seed_and_epoch():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = ModalityGroupedSampler(HAS_IMAGES, 2, seed, world_size=2)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(3, 0) == order(3, 0) and order(3, 1) == order(3, 1)
    assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)
    # Without set_epoch, each pass moves on to the next epoch; set_epoch (what the Trainer calls) agrees with it.
    sampler = ModalityGroupedSampler(HAS_IMAGES, 2, 3, world_size=2)
    assert [list(sampler) for _ in range(3)] == [order(3, epoch) for epoch in range(3)]


def test_length_grouping_still_groups_lengths():
    lengths = [(i * 37) % 101 + 5 for i in range(len(HAS_IMAGES))]

    def padding(grouped: bool) -> int:
        """Pad tokens of every rank's batches: each batch is padded to its longest row."""
        ranks = rank_batches(HAS_IMAGES, 4, 2, seed=1, lengths=lengths if grouped else None)
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for rank in ranks for b in rank)

    sampler = ModalityGroupedSampler(HAS_IMAGES, 4, 1, lengths, world_size=2)
    order = list(sampler)
    global_batches = [order[s : s + 8] for s in range(0, len(order), 8)]
    # Every global batch is a run of one mega-batch sorted longest first (fewer than 50 global batches here).
    assert all([lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True) for b in global_batches)
    assert padding(grouped=True) < padding(grouped=False) / 3


def test_a_modality_smaller_than_a_global_batch_is_cycled():
    has_images = [True] * 9 + [False]  # one text row, global batches of 3 ranks × 2
    ranks = rank_batches(has_images, 2, 3)
    assert all(len(modalities) == 1 for modalities in micro_step_modalities(ranks, has_images))
    trained = Counter(i for rank in ranks for batch_rows in rank for i in batch_rows)
    assert set(trained) == set(range(10)) and trained[9] == 6 and sum(trained.values()) == 12 + 6


def test_the_plan_counts_the_modality_padding():
    # 10 image rows and 6 text rows on 2 processes × 2 rows: 3 + 2 global batches, not ceil(16 / 4) = 4.
    sft = SFTParams(per_device_train_batch_size=2, num_train_epochs=3, accelerate_config="conf/accelerate/cpu_ddp.yaml")
    assert plan_steps(16, 2, sft)["steps_per_epoch"] == 4  # one modality: transformers' own sampler
    steps = plan_steps(16, 2, sft, vision_records=10)
    assert (steps["batches_per_epoch"], steps["steps_per_epoch"], steps["total_steps"]) == (5, 5, 15)
    assert steps["repeated_rows"] == 4
    # With accumulation 2 the fifth micro-step is a short last step, as the Trainer does it.
    accumulating = sft.model_copy(update={"gradient_accumulation_steps": 2})
    assert plan_steps(16, 2, accumulating, vision_records=10)["steps_per_epoch"] == 3
    # The plan the training node builds reads the image rows from the preprocessed split.
    data = Dataset.from_dict({"image_paths": [["a.png"]] * 10 + [[]] * 6, "length": [30] * 16})
    assert training_data(data)["vision_records"] == 10
    plan = build_plan(
        model_dir=PROJECT_ROOT / "conf/model_configs/qwen2.5-vl-7b-instruct",
        sft=sft,
        method=MethodParams(learning_rate=1e-4, lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}),
        images=ImageBounds().model_dump(),
        **training_data(data),
        max_length=512,
    )
    assert plan["steps"]["total_steps"] == 15


# --- two processes -------------------------------------------------------------------------------------------

PER_DEVICE = 2
WORLD_SIZE = 2
EPOCHS = 2
SEED = 0

# The trainer as it was before rank alignment, launched in place of `-m vlm_pipeline.training.trainer`: the same
# trainer, whose sampler makes only each rank's own batch one modality (a sampler for one rank, world_size 1).
LOCAL_BATCHES_ONLY = """
from vlm_pipeline.training import trainer


class LocalBatchesOnly(trainer.ModalityGroupedSampler):
    def __init__(self, has_images, batch_size, seed, lengths=None, world_size=1):
        super().__init__(has_images, batch_size, seed, lengths, world_size=1)


trainer.ModalityGroupedSampler = LocalBatchesOnly
trainer.main()
"""


class TrainingDidNotFinish(RuntimeError):
    """The launched run exited non-zero."""


class TrainingHung(TrainingDidNotFinish):
    """The launched run stopped making progress, or outlasted its time limit, and was killed."""


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill the launcher and every process under it (torchrun starts its workers in sessions of their own, so
    killing the launcher's process group would leave hung workers behind, holding the port)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(proc.pid)
        for process in [*parent.children(recursive=True), parent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    proc.wait()


def run_launched(command: list[str], timeout: float, stall: float | None = None) -> str:
    """Run ``command`` and return its output. Raise ``TrainingHung`` (after killing every process of the run) when
    it is still running after ``timeout`` seconds or, with ``stall``, prints nothing for ``stall`` seconds once
    training has logged its first loss (a step takes well under a second here); ``TrainingDidNotFinish`` when it
    exits non-zero."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=PROJECT_ROOT)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output: list[str] = []
    start = last = time.monotonic()
    training = False
    while True:
        now = time.monotonic()
        if now - start > timeout:
            hung = f"still running after {timeout:g} s"
        elif stall is not None and training and now - last > stall:
            hung = f"no output for {stall:g} s after training began"
        else:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            output.append(line)
            last = time.monotonic()
            training = training or "vlm-pipeline: trainable parameters" in line  # printed just before train()
            continue
        kill_tree(proc)
        raise TrainingHung(f"{hung}; killed. Last output:\n{''.join(output)[-3000:]}")
    proc.wait()
    if proc.returncode != 0:
        raise TrainingDidNotFinish(f"exit code {proc.returncode}:\n{''.join(output)[-4000:]}")
    return "".join(output)


VIDEO_RECORDS = 2  # the video demo's first training clips


def media_root(data: Path) -> Path:
    """The folder of the mixed set's images and clips, beside its tokenised data."""
    return data.parent / "media"


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory, tiny_models) -> Path:
    """10 image questions, 2 video questions and 6 text-only questions, tokenised for the tiny Qwen2.5-VL: the
    vision tower reads both image and video micro-steps, so ranks must agree only on vision or text."""
    folder = tmp_path_factory.mktemp("mixed_ranks")
    root = media_root(folder / "train")
    shutil.copytree(RAW / "shapes_vqa/images", root / "images")
    videos = (RAW / "motion_vqa/train.jsonl").read_bytes().splitlines()[:VIDEO_RECORDS]
    for line in videos:
        (clip,) = json.loads(line)["videos"]
        (root / clip).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RAW / "motion_vqa" / clip, root / clip)
    records = mixed_records() + validate_lines(videos, root, max_image_pixels=10**8).valid
    context = run_context(tiny_models["qwen2_5_vl"], root)
    train, quarantine, _ = tokenize_split(records, context, PreprocessingParams(max_length=512))
    kinds = Counter(
        "video" if clips else "image" if paths else "text"
        for paths, clips in zip(train["image_paths"], train["video_samples"], strict=True)
    )
    assert not quarantine and kinds == {"image": 10, "video": VIDEO_RECORDS, "text": 6}
    train.save_to_disk(str(folder / "train"))
    return folder / "train"


def train(
    out: Path,
    accelerate_config: str,
    per_device: int,
    model: Path,
    data: Path,
    script: Path | None = None,
    timeout: float = 300,
    stall: float | None = None,
    **sft,
) -> tuple[Path, str]:
    config = launched_run_config(
        out, model, data, media_root(data), accelerate_config, per_device, seed=SEED, num_train_epochs=EPOCHS, **sft
    )
    final = out / "final"
    command = launch_command(str(PROJECT_ROOT / accelerate_config), config)
    if script is not None:
        module = command.index("vlm_pipeline.training.trainer")
        command[module - 1 : module + 1] = [str(script)]
    return final, run_launched(command, timeout, stall)


def losses(final: Path) -> list[float]:
    return [entry["loss"] for entry in json.loads((final / "training_history.json").read_text()) if "loss" in entry]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_models, mixed_data) -> tuple[int, list[float]]:
    """Steps and losses of one process with the same global batch (2 × 2 rows)."""
    final, _ = train(
        tmp_path_factory.mktemp("single"),
        "conf/accelerate/cpu_single_process.yaml",
        PER_DEVICE * WORLD_SIZE,
        tiny_models["qwen2_5_vl"],
        mixed_data,
    )
    info = json.loads((final / "run_info.json").read_text())
    assert info["world_size"] == 1
    return info["global_step"], losses(final)


def assert_one_run_of_two_ranks(final: Path, output: str, wrapper: str, mixed_data: Path, single_process) -> list:
    """Two ranks trained the planned steps under ``wrapper``, the first like one process with the same global
    batch, and the loss went down; the losses."""
    assert f"each micro-step of all {WORLD_SIZE} rank(s) takes one modality" in output
    info = json.loads((final / "run_info.json").read_text())
    assert (info["world_size"], info["engine"]) == (WORLD_SIZE, wrapper)
    sft = SFTParams(per_device_train_batch_size=PER_DEVICE, num_train_epochs=EPOCHS)
    data = training_data(load_from_disk(str(mixed_data)))
    plan = plan_steps(data["records"], WORLD_SIZE, sft, data["vision_records"])
    single_steps, single_losses = single_process
    # 12 vision rows (10 image, 2 video) and 6 text rows in global batches of 4: 3 + 2 a epoch (transformers alone
    # would take 5).
    assert info["global_step"] == single_steps == plan["total_steps"] == 5 * EPOCHS
    trained = losses(final)
    assert len(trained) == info["global_step"]
    # The first step trains the same rows from the same weights as the single process: the same global batch.
    assert trained[0] == pytest.approx(single_losses[0], rel=1e-3)
    assert sum(trained[-3:]) / 3 < sum(trained[:3]) / 3  # the loss goes down
    return trained


# The launched tests share the accelerate files' fixed ports with tests/test_distributed.py: one xdist worker.
@pytest.mark.slow
@pytest.mark.xdist_group("torch_distributed_ports")
def test_two_ranks_train_a_mixed_set_under_zero3(tmp_path, tiny_models, mixed_data, single_process):
    accelerate_config = "conf/accelerate/cpu_deepspeed_zero3.yaml"
    final, output = train(tmp_path, accelerate_config, PER_DEVICE, tiny_models["qwen2_5_vl"], mixed_data)
    assert_one_run_of_two_ranks(final, output, "DeepSpeedEngine", mixed_data, single_process)


RESUME_AT = 7  # the third of epoch 1's five optimizer steps


@pytest.mark.slow
@pytest.mark.xdist_group("torch_distributed_ports")
def test_ddp_with_checkpointing_trains_a_mixed_set_and_resumes_mid_epoch_in_its_order(
    tmp_path, tiny_models, mixed_data, single_process
):
    """DDP with gradient checkpointing: the vision tower trains (full fine-tuning), and a text-only micro-step leaves
    it without gradients, which DDP refuses unless it searches for unused parameters (transformers turns that search
    off whenever checkpointing is on).

    Then the run as a kill after step 7 (epoch 1 of 0-1) leaves it resumes into epoch 1's order, not a replay of
    epoch 0's: each resumed step trains the same rows from the same weights as the uninterrupted run, so its loss is
    equal."""
    data = load_from_disk(str(mixed_data))
    has_images = vision_rows(data)
    steps_per_epoch = 5
    # The test can fail: epoch 0's order, replayed from the resume point, would train other rows.
    replayed, resumed = (
        rank_batches(has_images, PER_DEVICE, WORLD_SIZE, SEED, epoch=epoch)[0][RESUME_AT - steps_per_epoch :]
        for epoch in (0, 1)
    )
    assert replayed != resumed
    accelerate_config = "conf/accelerate/cpu_ddp.yaml"
    sft = {"gradient_checkpointing": True, "save_steps": RESUME_AT}
    final, output = train(tmp_path, accelerate_config, PER_DEVICE, tiny_models["qwen2_5_vl"], mixed_data, **sft)
    uninterrupted = assert_one_run_of_two_ranks(final, output, "DistributedDataParallel", mixed_data, single_process)
    # As a kill after checkpoint-7 leaves it: no finished run, checkpoint-7 the newest complete checkpoint (the
    # Trainer also saved the last step, checkpoint-10).
    checkpoints = RunConfig.read(tmp_path / "run_config.json").checkpoint_dir
    for later in [checkpoints / "final", *checkpoints.glob("checkpoint-1?"), final]:
        shutil.rmtree(later)
    final, output = train(tmp_path, accelerate_config, PER_DEVICE, tiny_models["qwen2_5_vl"], mixed_data, **sft)
    assert f"resuming from {checkpoints / f'checkpoint-{RESUME_AT}'}" in output
    assert losses(final) == pytest.approx(uninterrupted, rel=1e-4)


@pytest.mark.xfail(
    strict=True,
    raises=TrainingHung,
    reason="before rank alignment: one rank gathers the vision tower for an image batch while the other runs a "
    "text batch, and ZeRO-3 hangs",
)
@pytest.mark.slow
@pytest.mark.xdist_group("torch_distributed_ports")
def test_unaligned_ranks_hang_under_zero3(tmp_path, tiny_models, mixed_data):
    # The old order does put the two ranks on different modalities in this run (so a hang is the expected outcome).
    data = load_from_disk(str(mixed_data))
    has_images = vision_rows(data)
    ranks = rank_batches(has_images, PER_DEVICE, WORLD_SIZE, SEED, list(data["length"]), aligned=False)
    assert any(len(modalities) == 2 for modalities in micro_step_modalities(ranks, has_images))
    script = tmp_path / "local_batches_only.py"
    script.write_text(LOCAL_BATCHES_ONLY)
    train(
        tmp_path / "run",
        "conf/accelerate/cpu_deepspeed_zero3.yaml",
        PER_DEVICE,
        tiny_models["qwen2_5_vl"],
        mixed_data,
        script=script,
        stall=10,
    )
