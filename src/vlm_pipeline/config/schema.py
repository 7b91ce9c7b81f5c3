"""One pydantic model per parameter group: names, types, ranges and help text, checked in well under a second.

Field names are the libraries' own (TRL ``SFTConfig``, PEFT ``LoraConfig``, transformers
``BitsAndBytesConfig``), so the seeds' recipes and the libraries' docs apply unchanged. A test checks that
every ``sft`` field here is still an ``SFTConfig`` field, so an upgrade that renames one fails in CI rather
than on a GPU. Nothing here imports torch or TRL: a typo must fail before the heavy imports.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A parameter names an unknown key, a bad value or an impossible combination; the message says which."""


class KeyMessage(ValueError):
    """A sentence about one key of a group, reported under the key's full name (``sft.learning_rate is ...``)
    rather than the group's (``sft: learning_rate is ...``), so the message names what the user typed."""

    def __init__(self, key: str, sentence: str):
        super().__init__(f"{key} {sentence}")
        self.key = key
        self.sentence = sentence


# Keys in `sft` that our launcher and trainer consume; everything else goes to TRL's SFTConfig. (TRL's own
# padding_free refuses a custom collator, so our collator implements it under the same name.)
LAUNCHER_KEYS = {"accelerate_config", "padding_free", "divergence_check", "max_tokens_per_batch"}
# The seeds' older names. RENAMED: same value, new name (accepted with a warning).
RENAMED = {
    "evaluation_strategy": "eval_strategy",  # transformers 4.46
    "warmup_ratio": "warmup_steps",  # transformers 5: a float in [0, 1) is a ratio
}
CATALOG_OWNS_PATHS = "the catalog (conf/base/catalog.yml) says where checkpoints and models go"
# Older names whose meaning moved elsewhere: rejected, naming where it went.
MOVED = {
    "max_seq_length": "preprocessing.max_length (TRL renamed it max_length; vlm-pipeline checks lengths at "
    "preprocessing, with the real processor)",
    "fp16_opt_level": "nothing: it was apex's AMP level, removed from transformers; use sft.fp16 or sft.bf16",
    "group_by_length": "sft.train_sampling_strategy: group_by_length (transformers 5)",
}
# TRL's current SFTConfig names that this project keeps elsewhere: rejected, saying why and what to set instead
# (they are not old, so the message must not call them that).
ELSEWHERE = {
    "learning_rate": "each method has its own: set lora.method.learning_rate (the lora pipeline) or "
    "full_ft.method.learning_rate (full_ft)",
    "hub_token": "it comes from the HF_TOKEN environment variable (a token in a parameters file would be logged and "
    "committed)",
    "output_dir": f"{CATALOG_OWNS_PATHS}; drop it",
}
# Removed because the behaviour is now the only one: accepted with a warning if set to that behaviour.
ALWAYS = {"save_safetensors": True}

OPTIMIZERS = (
    "adamw_torch_fused",
    "adamw_torch",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "adafactor",
    "sgd",
    "lion_8bit",
    "paged_lion_8bit",
)
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


class Section(BaseModel):
    """A parameter group: unknown keys are errors (a typo never silently falls back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    def __str__(self) -> str:
        # JSON, as kedro-mlflow logs a typed node parameter by str(): one readable value per group.
        return self.model_dump_json()


SectionT = TypeVar("SectionT", bound=Section)


# --- stage 1 and 2: data ------------------------------------------------------------------------------------


class DataValidationParams(Section):
    max_invalid_fraction: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Largest share of records that may be quarantined before the run stops (0.0 = any bad record "
        "stops it). Range 0.0-0.1; more usually means a format or path problem.",
    )
    max_image_pixels: int = Field(
        12_845_056, gt=0, description="Images with more pixels are rejected before they can exhaust memory. 1e5-2e7."
    )
    duplicates: Literal["reject", "keep"] = Field(
        "reject", description="Exact duplicate records: reject (quarantine the later copies) or keep."
    )
    test_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Used only when raw_data has no test.jsonl: the share of train.jsonl held out as the test split, "
        "chosen by a hash of each record (appending records never moves earlier ones). 0.05-0.2.",
    )
    leakage: Literal["warn", "reject"] = Field(
        "warn",
        description="Test records whose prompt and images (by content) also appear in train: warn (count and log "
        "them) or reject (quarantine them as train_test_overlap).",
    )
    max_video_seconds: float = Field(
        600.0,
        gt=0.0,
        description="Longest video accepted, in seconds; a longer one is quarantined whole as video_too_long (a "
        "video is never cut). 10-3600: Qwen2.5-VL reads clips of up to an hour, but frames cost tokens and memory.",
    )
    frame_folder_fps: float = Field(
        2.0,
        gt=0.0,
        description="The frame rate of a video given as a folder of frame images (a folder states none): its "
        "duration is frames / this. 1-30; 2 is Qwen's own rate for frame lists.",
    )


class ImageBounds(Section):
    """Limits on image size, applied by the processor; None keeps the checkpoint's own. Each field is honoured only
    by the families that list it in ``Architecture.image_bound_fields``, and its description names them as
    ``(registry name)``; tests/test_architectures.py checks both against the registry."""

    min_pixels: int | None = Field(
        None, ge=3136, description="Qwen2.5-VL (qwen2_5_vl): smallest image area in pixels (28×28 units)."
    )
    max_pixels: int | None = Field(
        None,
        ge=3136,
        le=12_845_056,
        description="Qwen2.5-VL (qwen2_5_vl): largest image area; bounds image tokens and memory.",
    )
    max_image_tiles: int | None = Field(
        None,
        ge=1,
        le=4,
        description="Llama 3.2-Vision (mllama): 560×560 tiles per image; only the checkpoint's own count (4) runs.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> ImageBounds:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is larger than max_pixels {self.max_pixels}")
        return self


class VideoSampling(Section):
    """Which frames of a video the model sees and at what size (Qwen's names and rule, qwen-vl-utils); honoured by
    the families with a video processor (Qwen2.5-VL). None keeps the checkpoint's own size limits."""

    fps: float = Field(2.0, gt=0.0, description="Frames sampled per second of video. 0.5-4; Qwen's own default is 2.")
    min_frames: int = Field(
        4, ge=1, description="Fewest frames sampled from a clip (a shorter clip gives all it has). Qwen's own: 4."
    )
    max_frames: int = Field(
        768,
        ge=2,
        description="Most frames sampled from a clip, rounded down to whole temporal patches (2 frames). 16-768.",
    )
    min_pixels: int | None = Field(
        None, ge=3136, description="Smallest frame area in pixels after resizing (28×28 units); null: checkpoint's."
    )
    max_pixels: int | None = Field(
        None,
        ge=3136,
        le=12_845_056,
        description="Largest frame area in pixels; null: the checkpoint's. Qwen's reference uses 602,112 (768 "
        "tokens a frame pair).",
    )
    total_pixels: int | None = Field(
        None,
        ge=3136,
        description="Pixels of all sampled frames together: each frame is capped at an even share (never below "
        "min_pixels), Qwen's per-video budget. null: the checkpoint's (128,000 video tokens).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> VideoSampling:
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames {self.min_frames} is larger than max_frames {self.max_frames}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is larger than max_pixels {self.max_pixels}")
        return self


# `num_proc: auto` stops here: beyond it, each process's copy of the processor costs more than the cores add.
MAX_AUTO_PROCESSES = 32


class PreprocessingParams(Section):
    max_length: int = Field(
        512, ge=16, le=131_072, description="Longest record in tokens, image tokens included. Range 128-8192."
    )
    truncate_text_only: bool = Field(
        False, description="Cut over-long text-only records instead of setting them aside (images are never cut)."
    )
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = Field(
        "all_assistant_turns", description="Which assistant turns carry labels."
    )
    validation_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of train records held out for eval during training (the validation loss curve). "
        "0.05-0.1; 0 = none (then sft.eval_strategy no).",
    )
    num_proc: int | Literal["auto"] = Field(
        1,
        description="Processes for tokenisation (datasets.map): a count, or auto for this host's cores, at most "
        f"{MAX_AUTO_PROCESSES} (GPU hosts have 32-128; the recipes' environments set auto). 1 on the demo.",
    )
    images: ImageBounds = Field(default_factory=ImageBounds, description="Image bounds applied by the processor.")
    videos: VideoSampling = Field(
        default_factory=VideoSampling, description="Frame sampling and frame size for video records."
    )
    chat_template: str | None = Field(
        None,
        description="A .jinja file that replaces the checkpoint's chat template wherever the processor loads "
        "(preprocessing, training, the saved model, evaluation). Null: the checkpoint's own, unchanged.",
    )
    template_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"date_string": "26 Jul 2024"},
        description="Variables every chat-template rendering gets. date_string pins Llama 3's 'Today Date' "
        "(otherwise today's date), so the same data gives the same tokens on any day.",
    )

    @property
    def processes(self) -> int:
        """``num_proc`` as a count: auto is this host's cores (``os.cpu_count``), at most MAX_AUTO_PROCESSES."""
        return min(os.cpu_count() or 1, MAX_AUTO_PROCESSES) if self.num_proc == "auto" else self.num_proc

    @field_validator("num_proc", mode="before")
    @classmethod
    def _process_count(cls, value: Any) -> Any:
        # One message for both forms (pydantic would report each member of the union on a line of its own).
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256):
            return value
        raise ValueError(f"expected a count of processes from 1 to 256, or auto; got {value!r}")

    @field_validator("chat_template")
    @classmethod
    def _template_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(
                f"{value} does not exist: give a .jinja file (conf/model_configs/*/chat_template.jinja), or null for "
                "the checkpoint's own"
            )
        return value


# --- how every stage loads the model (TRL ModelConfig names) --------------------------------------------------

DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# The seeds' older spellings of an attention implementation.
ATTENTION_ALIASES = {"flash": "flash_attention_2", "flash_attn": "flash_attention_2", "fa2": "flash_attention_2"}
# Attention implementations that need a package beyond torch.
ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


class ModelParams(Section):
    """TRL ``ModelConfig`` fields: how training, the merge and evaluation load the model."""

    dtype: Literal[DTYPES] = Field(  # type: ignore[valid-type]
        "float32",
        description="dtype the weights load in: float32, bfloat16 (half the memory; the seeds' choice on GPUs), "
        "float16, or auto (the checkpoint's own). With LoRA the frozen base stays in it and the adapters train "
        "in float32.",
    )
    attn_implementation: Literal[ATTENTION] = Field(  # type: ignore[valid-type]
        "sdpa",
        description="Attention kernel: sdpa (PyTorch, any device), eager, flash_attention_2 (needs the flash-attn "
        "package and a GPU; bf16/fp16 only).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run Python shipped inside the model folder (custom architectures). Only for checkpoints you "
        "trust; a warning is logged when it is on.",
    )

    def loading_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``load_model``: dtype, attention kernel and trust_remote_code."""
        return self.model_dump()

    @model_validator(mode="before")
    @classmethod
    def _seed_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "torch_dtype" in data:
            if "dtype" in data:
                raise ValueError("torch_dtype and dtype are both set: keep dtype (torch_dtype is its older name)")
            logger.warning("model.torch_dtype is an older name; using model.dtype")
            data["dtype"] = data.pop("torch_dtype")
        alias = ATTENTION_ALIASES.get(data.get("attn_implementation"))
        if alias:
            logger.warning(
                "model.attn_implementation %s is an older name; using %s", data["attn_implementation"], alias
            )
            data["attn_implementation"] = alias
        return data

    @model_validator(mode="after")
    def _flash_needs_half(self) -> ModelParams:
        if self.attn_implementation.startswith("flash_attention") and self.dtype == "float32":
            raise ValueError(f"attn_implementation {self.attn_implementation} runs in bfloat16 or float16, not float32")
        return self


# --- stage 3: training (TRL SFTConfig names) -----------------------------------------------------------------


class SFTParams(Section):
    """TRL ``SFTConfig`` fields vlm-pipeline supports, plus ``accelerate_config`` and ``padding_free``."""

    accelerate_config: str = Field(
        "conf/accelerate/cpu_single_process.yaml",
        description="accelerate config file (conf/accelerate/*.yaml): processes, DeepSpeed/FSDP, machines.",
    )
    padding_free: bool | None = Field(
        None,
        description="Pack each micro-batch's records into one row with no pad tokens, each record at its own "
        "positions and attending only to itself (exact: the same loss and gradients as the records one at a time). "
        "null: on wherever the model's family packs (Qwen2.5-VL, Llama text), off where it cannot (Llama-3.2-Vision: "
        "true is refused before the run; sft.max_tokens_per_batch cuts its padding instead). false: padded rows.",
    )
    divergence_check: bool = Field(
        True,
        description="Stop the run when the training loss diverges: at an optimizer step where the mean loss of the "
        "last 10 steps is above 3 times the mean of the first 3 steps (each step's loss as transformers logs it, "
        "averaged over all processes). The message names the step, the newest checkpoint and the learning rate. "
        "false: train on whatever the loss does.",
    )
    seed: int = Field(42, ge=0, description="Seed for new weights (LoRA), data order and dropout.")
    num_train_epochs: float = Field(
        12, gt=0, description="Passes over the training set. Range 1-10 on real data; the tiny demo needs 12."
    )
    max_steps: int = Field(-1, ge=-1, description="If > 0, stop after this many optimizer steps (overrides epochs).")
    per_device_train_batch_size: int = Field(16, ge=1, description="Rows per device per forward pass. 1-16 for VLMs.")
    max_tokens_per_batch: int | None = Field(
        None,
        ge=16,
        description="Fill each micro-batch with as many records as fit this many tokens (image tokens included) "
        "instead of per_device_train_batch_size rows: records of about one length together, image and text-only "
        "records apart, the same batches every epoch in a new order. A padded batch costs its rows × its longest "
        "record, a packed one (padding_free) the sum of its records. At least preprocessing.max_length; a few times "
        "it on a large GPU (the plan's memory estimate is sized by it). null: per_device_train_batch_size rows.",
    )
    per_device_eval_batch_size: int = Field(8, ge=1, description="Rows per device per evaluation forward pass.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Forward passes per optimizer step. Effective batch = per-device × this × processes."
    )
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] = Field(
        "group_by_length", description="Batch order; group_by_length batches similar lengths (less padding)."
    )
    optim: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "adamw_torch", description="Optimizer (transformers' name). 8bit/paged ones need bitsandbytes."
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Decoupled weight decay. Range 0.0-0.1.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW β1. Usually 0.9.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW β2. 0.95-0.999.")
    adam_epsilon: float = Field(1e-8, gt=0.0, le=1e-3, description="AdamW ε. 1e-8 (1e-6 with fp16 is common).")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip the gradient norm to this. 0.3-1.0; 0 = no clip.")
    lr_scheduler_type: Literal[SCHEDULERS] = Field(  # type: ignore[valid-type]
        "cosine", description="Learning-rate schedule: cosine, linear, constant, constant_with_warmup, ..."
    )
    lr_scheduler_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra schedule arguments, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr."
    )
    warmup_steps: float = Field(
        0.05, ge=0, description="Linear warm-up: a whole number of steps, or a share of all steps below 1 (e.g. 0.1)."
    )
    bf16: bool = Field(False, description="bf16 mixed precision (Ampere+ GPUs; CPUs emulate it).")
    fp16: bool = Field(False, description="fp16 mixed precision with loss scaling, for GPUs without bf16.")
    bf16_full_eval: bool = Field(False, description="Evaluate in pure bf16 (faster, slightly less exact).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: ~30% slower, far less memory."
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        None, description="Passed to torch checkpointing, e.g. {use_reentrant: false} (needed with LoRA and FSDP)."
    )
    logging_steps: float = Field(10, gt=0, description="Log every N optimizer steps (a share below 1 of all steps).")
    eval_strategy: Literal["no", "steps", "epoch"] = Field(
        "steps", description="When to evaluate on the validation split: no, steps (every eval_steps) or epoch."
    )
    eval_steps: float | None = Field(
        50, gt=0, description="Evaluate every N steps and at the last (with eval_strategy steps); below 1 a share."
    )
    save_strategy: Literal["no", "steps", "epoch", "best"] = Field("steps", description="When to write checkpoints.")
    save_steps: float = Field(200, gt=0, description="Checkpoint every N optimizer steps (resume points).")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most this many checkpoints. 1-5.")
    load_best_model_at_end: bool = Field(
        False, description="End with the checkpoint best on metric_for_best_model (needs eval and save to align)."
    )
    metric_for_best_model: str | None = Field(None, description="Metric for the best checkpoint, e.g. eval_loss.")
    greater_is_better: bool | None = Field(None, description="Whether a larger metric_for_best_model is better.")
    remove_unused_columns: bool = Field(
        False, description="Must stay false: the collator needs the image_paths column (the seeds set it false too)."
    )
    ddp_find_unused_parameters: bool | None = Field(
        None, description="DDP: search for unused parameters each step (slow); false with FSDP/frozen towers."
    )
    ddp_timeout: int = Field(
        1800,
        ge=1,
        description="Seconds a rank waits in a collective for the others before it fails: how soon a lost node or "
        "process stops the run instead of hanging it (transformers' default, 30 min, covers slow checkpoint saves).",
    )
    dataloader_num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes. 0 = main process.")
    dataloader_pin_memory: bool = Field(
        False, description="Pinned host memory for faster host-to-GPU copies; true on GPU hosts (CPU: warns only)."
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "warmup_ratio" in data and "warmup_steps" in data:
            raise ValueError(
                "warmup_steps and warmup_ratio are both set: keep one (warmup_steps takes a ratio below 1 too)"
            )
        normalised: dict[str, Any] = {}
        for key, value in data.items():
            if key in MOVED:
                raise ValueError(f"{key} is an older name: use {MOVED[key]}")
            if key in ELSEWHERE:
                raise KeyMessage(key, f"is TRL's name, but here {ELSEWHERE[key]}")
            if key in ALWAYS:
                if value != ALWAYS[key]:
                    raise ValueError(f"{key}: {value} is not supported: weights are always saved as safetensors")
                logger.warning("sft.%s is an older setting and now always on; drop it", key)
                continue
            if key in RENAMED:
                logger.warning("sft.%s is an older name; using sft.%s", key, RENAMED[key])
                key = RENAMED[key]
            normalised[key] = value
        return normalised

    @field_validator("warmup_steps")
    @classmethod
    def _steps_or_ratio(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"{value} is neither a whole number of steps nor a share below 1")
        return value

    @field_validator("remove_unused_columns")
    @classmethod
    def _keep_columns(cls, value: bool) -> bool:
        if value:
            raise ValueError("must be false: the collator reads the image_paths column")
        return value

    @model_validator(mode="after")
    def _combinations(self) -> SFTParams:
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 are both true; choose one")
        if self.load_best_model_at_end:
            if self.eval_strategy == "no":
                raise ValueError("load_best_model_at_end needs eval_strategy steps or epoch")
            if self.save_strategy not in (self.eval_strategy, "best"):
                raise ValueError(
                    f"load_best_model_at_end needs save_strategy to match eval_strategy "
                    f"(got save_strategy {self.save_strategy}, eval_strategy {self.eval_strategy})"
                )
            if self.eval_strategy == "steps" and self.eval_steps and self.save_steps % self.eval_steps:
                raise ValueError(
                    f"load_best_model_at_end needs save_steps to be a multiple of eval_steps "
                    f"(got save_steps {self.save_steps:g}, eval_steps {self.eval_steps:g})"
                )
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("eval_strategy steps needs eval_steps")
        if self.lr_scheduler_type == "constant" and self.warmup_steps:
            logger.warning("sft.lr_scheduler_type constant ignores warmup_steps; constant_with_warmup applies it")
        return self

    def trainer_args(self) -> dict[str, Any]:
        """The fields TRL's SFTConfig takes: everything set here except the launcher's own keys."""
        return self.model_dump(exclude=LAUNCHER_KEYS, exclude_unset=False)


# --- the methods: LoRA, freezing, quantization ---------------------------------------------------------------


class LoraParams(Section):
    """PEFT ``LoraConfig`` fields."""

    r: int = Field(16, ge=1, le=1024, description="Rank of the low-rank update. Range 4-64.")
    lora_alpha: float = Field(32, gt=0, description="Scale: the update is multiplied by lora_alpha / r. 1-4 × r.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input. Range 0.0-0.1.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Layers that get adapters: module names (q_proj, ...) matched inside the language model of a "
        "VLM, 'all-linear', or a regex string matched against full module names (overrides the default scope).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter, e.g. [lm_head]."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling lora_alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): slower, sometimes better.")


class FreezeParams(Section):
    """Parts of the model whose weights stay fixed (full fine-tuning; LoRA freezes the base anyway)."""

    vision_tower: bool = Field(False, description="Freeze the image encoder (the usual choice for small data).")
    projector: bool = Field(False, description="Freeze the vision-to-language projector.")
    language_model: bool = Field(False, description="Freeze the language model (train only vision parts).")


class QuantizationParams(Section):
    """transformers ``BitsAndBytesConfig`` fields: the base loads quantized; only LoRA weights train."""

    load_in_8bit: bool = Field(False, description="Load the base in 8-bit (LLM.int8()).")
    load_in_4bit: bool = Field(False, description="Load the base in 4-bit (QLoRA).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; nf4 for QLoRA.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA).")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype of the matmuls on 4-bit weights."
    )
    llm_int8_skip_modules: list[str] | None = Field(
        None, description="Full dotted module names kept unquantized (default: the architecture's vision parts)."
    )

    @model_validator(mode="after")
    def _one_width(self) -> QuantizationParams:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit are both true; choose one")
        return self

    @property
    def enabled(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit


class MethodParams(Section):
    learning_rate: float = Field(gt=0.0, lt=1.0, description="Peak learning rate. LoRA 1e-5-5e-4; full FT 1e-5-5e-5.")
    learning_rates: dict[
        Literal["vision_tower", "projector", "language_model"], Annotated[float, Field(gt=0.0, lt=1.0)]
    ] = Field(
        default_factory=dict,
        description="Peak learning rate per component, over learning_rate for the components named, e.g. "
        "{vision_tower: 2e-6, projector: 1e-5}; each is its own optimizer parameter group (LoRA adapters take "
        "their module's component) and follows the same schedule. Each value in (0, 1); a component named must "
        "have trainable parameters.",
    )
    lora: LoraParams | None = Field(None, description="LoRA settings; absent for full fine-tuning.")
    freeze: FreezeParams = Field(default_factory=FreezeParams, description="Components kept frozen.")
    quantization: QuantizationParams | None = Field(None, description="Quantized base (LoRA only).")

    @model_validator(mode="before")
    @classmethod
    def _no_output_dir(cls, data: Any) -> Any:
        if isinstance(data, dict) and "output_dir" in data:
            raise ValueError(f"output_dir is not a parameter: {CATALOG_OWNS_PATHS}")
        return data

    @model_validator(mode="after")
    def _freeze_is_for_full_ft(self) -> MethodParams:
        if self.lora is not None and any(self.freeze.model_dump().values()):
            raise ValueError(
                "freeze applies to full fine-tuning; LoRA already freezes the base (choose where adapters go "
                "with lora.target_modules)"
            )
        return self

    @model_validator(mode="after")
    def _rates_for_trained_components(self) -> MethodParams:
        frozen = [name for name in self.learning_rates if getattr(self.freeze, name)]
        if frozen:
            raise ValueError(f"learning_rates names {', '.join(frozen)}, which freeze keeps frozen: drop one of them")
        return self

    @model_validator(mode="after")
    def _quantized_needs_lora(self) -> MethodParams:
        if self.quantization and self.quantization.enabled and self.lora is None:
            bits = 4 if self.quantization.load_in_4bit else 8
            raise ValueError(
                f"a {bits}-bit base cannot be fully fine-tuned (quantized weights take no gradient): "
                "add a lora block or drop quantization"
            )
        return self


class VariantParams(Section):
    method: MethodParams = Field(description="How this variant trains: learning rate, LoRA, freezing, quantization.")


# --- stages 4 and 5 ------------------------------------------------------------------------------------------


class MergeTolerance(Section):
    float32: float = Field(
        1e-4, gt=0, le=1e-2, description="Largest |logits(merged) - logits(base+adapter)|, absolute. 1e-5 to 1e-3."
    )
    bfloat16: float = Field(
        0.05,
        gt=0,
        le=0.5,
        description="Largest |logits(merged) - logits(base+adapter)| as a fraction of the largest |logit|. "
        "bf16 keeps 8 significant bits, so its rounding error scales with the value. 0.02-0.1.",
    )


class AdapterParams(Section):
    merge_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the merged model.")
    merge_tolerance: MergeTolerance = Field(
        default_factory=MergeTolerance, description="The merge check's tolerance for each merge_dtype."
    )
    merge_check_records: int = Field(8, ge=1, le=1024, description="Test records the merge check runs on. 1-64.")
    log_model: bool = Field(
        True,
        description="Log the merged model to the run's MLflow run as a pyfunc model (mlflow.pyfunc.load_model). "
        "It copies the weights into the artifact store: off for an 11B model on a small store.",
    )
    registered_model_name: str | None = Field(
        None,
        description="With mlflow.yml's mlflow_registry_uri set, register the logged model under this name "
        "(null: vlm-pipeline-<variant>). Without a registry URI nothing is registered.",
    )


class EvaluationParams(Section):
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Longest generated answer (greedy). Range 8-512.")
    batch_size: int = Field(16, ge=1, le=1024, description="Records per generation/loss batch. Range 1-64.")
    bootstrap_resamples: int = Field(
        1000,
        ge=100,
        le=100_000,
        description="Bootstrap resamples of the test records for the 95% exact-match intervals. Range 1000-10000.",
    )
    bootstrap_seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="Seed of the bootstrap resampling: a rerun gives the same intervals. Range 0-2**32-1.",
    )
    fail_if_worse: bool = Field(
        False,
        description="Fail the evaluation stage when the tuned model is flagged as not better: test loss not below "
        "the base model's, or exact match significantly below the base model's or the majority answer's (95% paired "
        "bootstrap). False: the flag is a warning, a line in report.md and the MLflow tag vlm_pipeline.verdict. "
        "true or false.",
    )
    serving_check: bool = Field(
        True,
        description="Serve the tuned (merged) model with the standard OpenAI-compatible server (`transformers serve`) "
        "on localhost, send it the first serving_check_records test prompts (images as data URLs, greedy, "
        "max_new_tokens) and compare its answers with the evaluation's: the share that agree is "
        "detailed_metrics.json's serving.agreement. true or false.",
    )
    serving_check_records: int = Field(
        8, ge=1, le=10_000, description="Test records the serving check sends, from the first. Range 1-100."
    )
    serving_check_strict: bool = Field(
        False,
        description="Fail the stage when a served answer differs from the evaluation's. False: a warning naming the "
        "first record that differs. true or false.",
    )
    serving_startup_timeout_s: int = Field(
        300,
        ge=5,
        le=7200,
        description="Seconds the serving check waits for the server to load the model and answer /health before it "
        "stops it and fails. Range 60 (a tiny model on CPU) to 1800 (an 11B model from a network disk).",
    )


class PlanParams(Section):
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        le=1024,
        description="Memory of one GPU in GB (80 for an A100/H100 80GB). The run stops before loading the model if "
        "the estimate is larger. Null: no check (CPU runs).",
    )


class Parameters(Section):
    """Every parameter group a run reads (conf/<env>/parameters*.yml merged over conf/base)."""

    raw_data: str = Field(description="Folder with train.jsonl, test.jsonl and the images they name.")
    base_model: str = Field(description="Local model directory (config.json, safetensors, processor).")
    model: ModelParams = Field(default_factory=ModelParams, description="How every stage loads the model.")
    data_validation: DataValidationParams = Field(default_factory=DataValidationParams, description="Stage 1.")
    preprocessing: PreprocessingParams = Field(default_factory=PreprocessingParams, description="Stage 2.")
    sft: SFTParams = Field(default_factory=SFTParams, description="Stage 3, shared by every method.")
    adapter: AdapterParams = Field(default_factory=AdapterParams, description="Stage 4.")
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams, description="Stage 5.")
    plan: PlanParams = Field(default_factory=PlanParams, description="The preflight plan (training's first node).")
    lora: VariantParams | None = Field(None, description="The lora pipeline's method (Kedro namespace lora).")
    full_ft: VariantParams | None = Field(None, description="The full_ft pipeline's method (namespace full_ft).")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trust_remote_code" in data:
            raise ValueError("trust_remote_code moved to model.trust_remote_code (TRL ModelConfig's name)")
        return data

    @model_validator(mode="after")
    def _budget_holds_a_record(self) -> Parameters:
        budget, longest = self.sft.max_tokens_per_batch, self.preprocessing.max_length
        if budget is not None and budget < longest:
            raise ValueError(
                f"sft.max_tokens_per_batch {budget} is below preprocessing.max_length {longest}: preprocessing keeps "
                "records of up to max_length tokens, and one longer than the budget fits in no micro-batch; raise "
                "the budget or lower max_length"
            )
        return self

    @model_validator(mode="after")
    def _variants(self) -> Parameters:
        if self.lora and self.lora.method.lora is None:
            raise ValueError("lora.method needs a lora block (r, lora_alpha, target_modules, ...)")
        if self.full_ft and self.full_ft.method.lora is not None:
            raise ValueError("full_ft.method has a lora block: full fine-tuning trains every weight")
        if self.sft.eval_strategy != "no" and not self.preprocessing.validation_fraction:
            raise ValueError(
                f"sft.eval_strategy {self.sft.eval_strategy} needs a validation split: "
                "set preprocessing.validation_fraction (e.g. 0.1)"
            )
        return self


# --- entry points --------------------------------------------------------------------------------------------


def validate_parameters(params: dict[str, Any]) -> Parameters:
    """The parameters as typed models; ConfigError naming every bad key (with the closest valid one)."""
    return parse_section(Parameters, params, "")


def parse_section(model: type[SectionT], data: dict[str, Any], where: str) -> SectionT:
    """One parameter group (``where`` is its dotted name, for messages); ConfigError naming every bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        prefix = tuple(where.split(".")) if where else ()
        raise ConfigError("\n".join(_describe(problem, model, prefix) for problem in error.errors())) from None


def normalise_sft(sft: dict[str, Any], where: str = "sft") -> dict[str, Any]:
    """``sft`` with legacy names mapped to today's and only the keys the user set; ConfigError otherwise."""
    model = parse_section(SFTParams, sft, where)
    return model.model_dump(include=model.model_fields_set)


def _describe(problem: dict[str, Any], root: type[BaseModel], prefix: tuple[str, ...]) -> str:
    loc = tuple(str(part) for part in problem["loc"])
    where = ".".join(prefix + loc)
    error = problem.get("ctx", {}).get("error")
    if isinstance(error, KeyMessage):
        return f"{'.'.join(prefix + loc + (error.key,))} {error.sentence}"
    if problem["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], _field_names(root, loc[:-1]), n=1, cutoff=0.6)
        hint = f"; did you mean {'.'.join(prefix + loc[:-1] + (close[0],))}?" if close else ""
        return f"unknown key {where}{hint}"
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] == "literal_error" and isinstance(problem.get("input"), str):
        options = problem.get("ctx", {}).get("expected", "")
        close = difflib.get_close_matches(problem["input"], [o.strip(" '") for o in options.split(",")], n=1)
        message += f"; did you mean {close[0]!r}?" if close else ""
    return f"{where}: {message}" if where else message


def _field_names(root: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """Field names of the model found at ``loc`` below ``root`` (for "did you mean")."""
    model: type[BaseModel] | None = root
    for part in loc:
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return []
    return sorted(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None or type(annotation).__name__ == "UnionType":
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
