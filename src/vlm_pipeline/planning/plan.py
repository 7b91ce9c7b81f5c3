"""The preflight plan of one run: its step arithmetic, tokens per step and memory per GPU, and the verdict.

``build_plan`` is what ``vlm-pipeline plan`` prints and what the training pipeline's first node computes, from
the same validated parameters, accelerate file and model ``config.json``; a run that would not fit in
``plan.gpu_memory_gb`` stops here, before any weights load, naming the settings that would fit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from vlm_pipeline.architectures import get_architecture
from vlm_pipeline.config import MethodParams
from vlm_pipeline.config.schema import LoraParams, QuantizationParams, SFTParams
from vlm_pipeline.data.encoding import vision_rows
from vlm_pipeline.data.video_sampling import row_samples
from vlm_pipeline.planning.memory import GIB, MemorySettings, estimate_memory
from vlm_pipeline.planning.model_shape import ModelShape, read_model_shape
from vlm_pipeline.planning.steps import plan_steps
from vlm_pipeline.reporting.tables import format_plan
from vlm_pipeline.training.token_budget import batch_cost, micro_batches

# Trained positions per chunk of TRL's chunked_nll loss, SFTConfig's default loss_type, which our trainer keeps
# (trl/trainer/sft_trainer.py: _CHUNKED_LM_HEAD_CHUNK_SIZE; a test checks it against the installed TRL).
TRL_LOSS_CHUNK_TOKENS = 256


class PlanError(RuntimeError):
    """The run as configured would not fit in ``plan.gpu_memory_gb``; the message names what would."""


def engine_settings(accelerate: dict[str, Any]) -> dict[str, Any]:
    """World size, sharding engine and offloading from an accelerate config file's contents."""
    kind = accelerate.get("distributed_type", "NO")
    world = int(accelerate.get("num_processes", 1) or 1)
    if kind == "DEEPSPEED":
        deepspeed = accelerate.get("deepspeed_config", {})
        return {
            "world_size": world,
            "engine": "zero3" if int(deepspeed.get("zero_stage", 2)) == 3 else "zero2",
            "offload_optimizer": deepspeed.get("offload_optimizer_device", "none") not in ("none", None),
            "offload_params": deepspeed.get("offload_param_device", "none") not in ("none", None),
        }
    if kind == "FSDP":
        offload = bool(accelerate.get("fsdp_config", {}).get("fsdp_offload_params", False))
        return {"world_size": world, "engine": "fsdp", "offload_optimizer": offload, "offload_params": offload}
    return {"world_size": world, "engine": "ddp" if world > 1 else "single"}


def load_dtype_bytes(dtype: str, model_dir: Path) -> int:
    """Bytes per weight as ``model.dtype`` loads it; ``auto`` reads the checkpoint's own dtype from config.json."""
    if dtype == "auto":
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return 4 if dtype == "float32" else 2


def memory_settings(
    sft: SFTParams,
    method: MethodParams,
    accelerate: dict[str, Any],
    *,
    seq_len: int,
    images_per_row: float,
    vision_tokens_per_image: int,
    video_patches_per_row: float = 0.0,
    load_bytes: int = 4,
    token_budget: dict[str, Any] | None = None,
) -> MemorySettings:
    """What our trainer does with these parameters, as memory settings: it loads the base at ``load_bytes`` per
    weight (``model.dtype``) and trains under autocast; DeepSpeed with bf16 casts the module to bf16 and keeps an
    fp32 master copy. With ``sft.max_tokens_per_batch`` (``token_budget``, see ``budget_batches``) a micro-batch
    is the budget's tokens, and the vision tower's batch the most rows a micro-batch with images holds."""
    engine = engine_settings(accelerate)
    mixed = sft.bf16 or sft.fp16
    quantization = method.quantization
    bits = None
    if quantization is not None and (quantization.load_in_8bit or quantization.load_in_4bit):
        bits = 8 if quantization.load_in_8bit else 4
    return MemorySettings(
        **engine,
        weight_bytes=2 if engine["engine"].startswith("zero") and mixed else load_bytes,
        bf16_compute=mixed or load_bytes == 2,
        quantization_bits=bits,
        double_quant=bool(quantization and quantization.bnb_4bit_use_double_quant),
        optimizer=sft.optim,
        batch_size=_vision_batch(token_budget) if token_budget else sft.per_device_train_batch_size,
        seq_len=seq_len,
        tokens_per_batch=sft.max_tokens_per_batch,
        images_per_row=images_per_row,
        vision_tokens_per_image=vision_tokens_per_image,
        video_patches_per_row=video_patches_per_row,
        gradient_checkpointing=sft.gradient_checkpointing,
        gradient_accumulation_steps=sft.gradient_accumulation_steps,
        loss_chunk_tokens=TRL_LOSS_CHUNK_TOKENS,
    )


def _vision_batch(token_budget: dict[str, Any]) -> int:
    """Rows of a token-budget micro-batch as the vision tower sees them: the most a micro-batch with images holds
    (with none, the most of any: the rows batch_size reports)."""
    return token_budget["most_image_rows"] or max(token_budget["most_rows"], 1)


def build_plan(
    *,
    model_dir: Path,
    sft: SFTParams,
    method: MethodParams,
    images: dict[str, Any],
    records: int,
    vision_records: int | None = None,
    lengths: list[int] | None = None,
    has_images: list[bool] | None = None,
    max_length: int,
    images_per_row: float | None = None,
    video_patches_per_row: float = 0.0,
    gpu_memory_gb: float | None = None,
    trust_remote_code: bool = False,
    load_dtype: str = "float32",
) -> dict[str, Any]:
    """The plan of one run: steps, tokens, memory terms (GiB), the verdict and, if over, the settings that fit.

    ``load_dtype`` is ``model.dtype``: the bytes of every weight the run does not train in float32.

    ``lengths`` are the preprocessed training records' token counts; without them (planning before any data),
    every row is assumed ``max_length`` long. ``vision_records`` (how many records have an image or a video)
    matters when the set mixes them with text-only records: those are batched by modality, which can take more
    steps. With ``sft.max_tokens_per_batch``, the records are cut into micro-batches by the trainer's own partition,
    from their ``lengths`` and ``has_images`` (each row's; without them, every row ``max_length`` long and of one
    modality).
    """
    accelerate = yaml.safe_load(Path(sft.accelerate_config).read_text(encoding="utf-8"))
    shape = read_model_shape(model_dir, method, trust_remote_code)
    world_size = engine_settings(accelerate)["world_size"]
    budget = None
    if sft.max_tokens_per_batch is not None:
        row_lengths = lengths if lengths else [max_length] * records
        budget = budget_batches(sft, shape, row_lengths, has_images or [shape.vision is not None] * records, world_size)
    steps = plan_steps(records, world_size, sft, vision_records, budget["micro_batches"] if budget else None)
    mean_length = sum(lengths) / len(lengths) if lengths else float(max_length)
    longest = max(lengths) if lengths else max_length
    vision = shape.vision is not None
    if not vision:
        images_per_row, video_patches_per_row = 0.0, 0.0
    elif images_per_row is None:  # planning before any data: one image per row
        images_per_row = 1.0
    settings = memory_settings(
        sft,
        method,
        accelerate,
        seq_len=longest,
        images_per_row=images_per_row,
        vision_tokens_per_image=get_architecture(shape.architecture).vision_tokens_per_image(images),
        video_patches_per_row=video_patches_per_row,
        load_bytes=load_dtype_bytes(load_dtype, model_dir),
        token_budget=budget,
    )
    memory = estimate_memory(shape, settings)
    plan = {
        "model": {
            "config": str(model_dir),
            "architecture": shape.architecture,
            "parameters": shape.parameters,
            "total_parameters": shape.total,
            "trainable_parameters": shape.trainable,
        },
        "steps": steps,
        "tokens_per_step": {
            "mean": round(mean_length * steps["effective_batch"]),
            "longest_row": longest,
            "source": "preprocessed lengths" if lengths else f"assumed max_length {max_length}",
        },
        "token_budget": budget,
        "settings": asdict(settings),
        "memory_gib": {name: value / GIB for name, value in memory.items()},
        "gpu_memory_gb": gpu_memory_gb,
    }
    plan["warnings"] = step_warnings(steps)
    plan["fits"] = None if gpu_memory_gb is None else memory["total"] <= gpu_memory_gb * 1e9
    if plan["fits"] is False:
        plan["alternatives"] = alternatives(
            model_dir, shape, settings, method, gpu_memory_gb, trust_remote_code, max_length
        )
    return plan


def budget_batches(
    sft: SFTParams, shape: ModelShape, lengths: list[int], has_images: list[bool], world_size: int
) -> dict[str, Any]:
    """The token-budget micro-batches the trainer will cut these rows into (``token_budget.micro_batches``), packed
    as ``sft.padding_free`` settles it for the model's family (null: where the family packs), and their sizes."""
    packed = get_architecture(shape.architecture).padding_free(sft.padding_free)
    batches = micro_batches(lengths, has_images, sft.max_tokens_per_batch, world_size, packed)
    return {
        "max_tokens": sft.max_tokens_per_batch,
        "layout": "packed" if packed else "padded",
        "micro_batches": len(batches),
        "mean_rows": round(len(lengths) / max(len(batches), 1), 1),
        "most_rows": max((len(batch) for batch in batches), default=0),
        "most_image_rows": max((len(batch) for batch in batches if has_images[batch[0]]), default=0),
        "largest_tokens": max((batch_cost([lengths[i] for i in batch], packed) for batch in batches), default=0),
    }


def step_warnings(steps: dict[str, Any]) -> list[str]:
    """Settings that run but are almost certainly not meant: a warm-up as long as the run never lets the learning
    rate reach its peak (a seed recipe's 1,000 warm-up steps on a 57-step run)."""
    warnings = []
    if steps["total_steps"] and steps["warmup_steps"] >= steps["total_steps"]:
        warnings.append(
            f"warm-up ({steps['warmup_steps']:,} steps) is not shorter than the run ({steps['total_steps']:,} steps): "
            "the learning rate never reaches its peak; lower sft.warmup_steps (below 1 it is a share of the steps)"
        )
    return warnings


def training_data(dataset: Any) -> dict[str, Any]:
    """What the plan reads from the preprocessed training split: its size, how many rows the vision tower reads (an
    image or a video), token lengths, images per row and the vision tower's video patches per row."""
    videos = dataset["video_samples"] if "video_samples" in dataset.column_names else []
    has_vision = vision_rows(dataset)  # an image or a video: the rows the vision tower reads, batched apart
    return {
        "records": len(dataset),
        "vision_records": sum(has_vision),
        "lengths": list(dataset["length"]),
        "has_images": has_vision,
        "images_per_row": sum(len(paths) for paths in dataset["image_paths"]) / max(len(dataset), 1),
        "video_patches_per_row": sum(
            sample["patches"] for text in videos for sample in row_samples({"video_samples": text})
        )
        / max(len(dataset), 1),
    }


def alternatives(
    model_dir: Path,
    shape: ModelShape,
    settings: MemorySettings,
    method: MethodParams,
    gpu_memory_gb: float,
    trust_remote_code: bool,
    max_length: int,
) -> list[dict[str, Any]]:
    """Changes that together bring the estimate under the budget: the usual knobs in order of how little they
    change the run (checkpointing first, QLoRA last), each kept if it lowers the estimate, until the run fits.
    Each entry is a change and the estimate with it and all before it; empty if even all of them do not fit.
    ``max_length``: a token budget is halved only while it still holds a record of ``max_length`` tokens."""
    chosen: list[dict[str, Any]] = []
    state = (shape, settings, method)
    total = estimate_memory(shape, settings)["total"]
    for label, change in _changes(model_dir, trust_remote_code, max_length, settings.tokens_per_batch is not None):
        changed = change(*state)
        if changed is None:
            continue
        changed_total = estimate_memory(changed[0], changed[1])["total"]
        if changed_total < total:
            state, total = changed, changed_total
            chosen.append({"change": label, "total_gib": total / GIB})
            if total <= gpu_memory_gb * 1e9:
                return chosen
    return []


def _changes(model_dir: Path, trust_remote_code: bool, max_length: int, token_budget: bool) -> list[tuple[str, Any]]:
    """Single changes to a (shape, settings, method) state; each returns the new state, or None if it does not apply.
    With ``token_budget`` (``sft.max_tokens_per_batch``) a micro-batch is cut by its tokens, not by its rows."""

    def halve_batch(shape, settings, method):
        accumulation = settings.gradient_accumulation_steps * 2
        if token_budget:
            tokens = settings.tokens_per_batch // 2
            if tokens < max_length:
                return None
            rows = max(settings.batch_size // 2, 1)
            halved = replace(
                settings, tokens_per_batch=tokens, batch_size=rows, gradient_accumulation_steps=accumulation
            )
            return shape, halved, method
        if settings.batch_size < 2:
            return None
        half = settings.batch_size // 2
        return shape, replace(settings, batch_size=half, gradient_accumulation_steps=accumulation), method

    batch = "sft.max_tokens_per_batch" if token_budget else "sft.per_device_train_batch_size"

    def checkpointing(shape, settings, method):
        return (
            None if settings.gradient_checkpointing else (shape, replace(settings, gradient_checkpointing=True), method)
        )

    def zero3(shape, settings, method):
        if settings.world_size < 2 or settings.engine == "zero3":
            return None
        return shape, replace(settings, engine="zero3", weight_bytes=2 if settings.bf16_compute else 4), method

    def offload(shape, settings, method):
        if settings.offload_optimizer or shape.lora:
            return None
        weight_bytes = 2 if settings.bf16_compute else 4
        return shape, replace(settings, engine="zero3", offload_optimizer=True, weight_bytes=weight_bytes), method

    def eight_bit_optimizer(shape, settings, method):
        return (
            None if "8bit" in settings.optimizer else (shape, replace(settings, optimizer="paged_adamw_8bit"), method)
        )

    def lora(shape, settings, method):
        if method.lora is not None:
            return None
        adapters = LoraParams(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        with_lora = method.model_copy(update={"lora": adapters})
        return read_model_shape(model_dir, with_lora, trust_remote_code), settings, with_lora

    def four_bit(shape, settings, method):
        if method.lora is None or settings.quantization_bits == 4:
            return None
        quantized = method.model_copy(update={"quantization": QuantizationParams(load_in_4bit=True)})
        return shape, replace(settings, quantization_bits=4), quantized

    return [
        ("sft.gradient_checkpointing=true", checkpointing),
        (f"{batch} halved, gradient_accumulation_steps doubled", halve_batch),
        ("sft.optim=paged_adamw_8bit", eight_bit_optimizer),
        ("sft.accelerate_config=conf/accelerate/deepspeed_zero3.yaml (ZeRO-3)", zero3),
        ("sft.accelerate_config=conf/accelerate/deepspeed_zero3_offload.yaml (optimizer on CPU)", offload),
        ("a lora block (r=16 on q/k/v/o) instead of full fine-tuning", lora),
        ("method.quantization.load_in_4bit=true (QLoRA)", four_bit),
    ]


def check_fits(plan: dict[str, Any]) -> None:
    """Raise ``PlanError`` (with the table) if the plan does not fit its GPU."""
    if plan["fits"] is False:
        raise PlanError(f"the run would not fit in plan.gpu_memory_gb={plan['gpu_memory_gb']:g}:\n{format_plan(plan)}")
