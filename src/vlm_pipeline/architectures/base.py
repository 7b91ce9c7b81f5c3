"""What the rest of the pipeline needs to know about one model family, and helpers shared by the builders."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from vlm_pipeline.atomic import replace_dir_atomic, staging_dir_for
from vlm_pipeline.config.schema import ConfigError

# The real checkpoints' published non-weight files (chat templates, processor settings, special tokens), from
# which the tiny builders make their twins. See conf/model_configs/SOURCES.md.
MODEL_CONFIGS = Path(__file__).resolve().parents[3] / "conf" / "model_configs"

# (processor, images per row, padded input_ids) -> the model's image keyword arguments for that batch
ImageInputsFn = Callable[[Any, list[list[Any]], torch.Tensor], dict[str, torch.Tensor]]
# (processor, each record's input_ids, the batch's media inputs (grids), the model's config) -> the packed row's
# position_ids
PackedPositionsFn = Callable[[Any, list[list[int]], dict[str, torch.Tensor], Any], torch.Tensor]


def restarting_positions(
    processor: Any, rows: list[list[int]], media: dict[str, torch.Tensor], model_config: Any = None
) -> torch.Tensor:
    """1-D rotary positions of a packed row, ``[1, L]``: each record's count from 0, which is also how
    transformers finds the records' boundaries (a block-diagonal mask, or flash attention's variable lengths)."""
    return torch.tensor([[position for row in rows for position in range(len(row))]])


@dataclass(frozen=True)
class Architecture:
    """One supported model family: its names, classes, chat-format tokens, image handling and tiny-model builder.

    A vision family must set every image field (``image_token``, ``image_inputs``, ``vision_mlp_gated``, and
    ``bound_images`` with its ``image_bound_fields`` unless it honours no bounds); a text-only one sets none of
    them. ``__post_init__`` refuses a record that mixes the two, so a new family cannot leave a stage guessing."""

    name: str
    """CLI / registry name, e.g. ``"qwen2_5_vl"``: ``--arch``, recipes and ``ModelShape.architecture`` use it."""

    model_type: str
    """The ``model_type`` in a checkpoint's ``config.json``, used to recognise a model directory."""

    is_vision: bool
    """True when the model takes images (loaded with ``AutoProcessor``); False for text-only (``AutoTokenizer``)."""

    model_class: type
    """The transformers class that loads the checkpoint, e.g. ``Qwen2_5_VLForConditionalGeneration``."""

    image_token: str | None
    """Placeholder the chat template writes per image (``<|image_pad|>``, ``<|image|>``); None for text-only."""

    end_of_turn_token: str
    """Token that closes every chat turn (``<|im_end|>``, ``<|eot_id|>``); it is part of each assistant label."""

    fine_tune_pad_token: str | None
    """Reserved token the family pads with when a checkpoint sets no pad token (Llama 3's
    ``<|finetune_right_pad_id|>``); None: pad with EOS."""

    real_checkpoint: RealCheckpointFiles
    """The real checkpoint's published non-weight files (``conf/model_configs/<folder>/``) the tiny twin is built
    from; the tests compare the twin, and the planner's estimates, with them."""

    build_tiny: Callable[[Path, int], Path] = field(repr=False)
    """``build_tiny(out_dir, seed)``: write a tiny random model of this architecture to ``out_dir``, return it."""

    vision_tokens_per_image: Callable[[dict], int] = field(repr=False)
    """``vision_tokens_per_image(bounds)``: the sequence one image gives the vision tower under ``bounds``
    (``preprocessing.images``; where they bound nothing, the family's documented default image), at the real
    checkpoint's patch and tile sizes. The planner's vision-activation estimate. Text-only families return 0."""

    image_inputs: ImageInputsFn | None = field(default=None, repr=False)
    """``image_inputs(processor, images_per_row, input_ids)``: pixel inputs for an already tokenised batch.

    Used by the collator, which pads pre-tokenised rows itself and so cannot call the processor on text.
    None for text-only architectures."""

    components: tuple[tuple[str, str], ...] = ()
    """``(component, parameter-name prefix)`` pairs, first match wins: which parameters are the vision tower,
    the projector and the language model. Used to freeze parts, to scope LoRA to the language model and
    for the trainable-parameter table. Parameters matching no prefix count as ``language_model``."""

    video_inputs: ImageInputsFn | None = field(default=None, repr=False)
    """``video_inputs(processor, videos_per_row, input_ids)``: the pixel inputs of a tokenised batch's videos (each
    a ``data.video_sampling.SampledVideo``). None for a family that reads no video: preprocessing sets its video
    records aside."""

    video_tokens: Callable[[Any, int, int, int], int] | None = field(default=None, repr=False)
    """``video_tokens(processor, frames, height, width)``: the language-model tokens of a video of that many sampled
    frames of that size, from sizes alone (the planner's count; tests/test_video_training.py checks it against the
    processor's output). None for a family that reads no video."""

    bound_videos: Callable[[Any, dict], None] | None = field(default=None, repr=False)
    """``bound_videos(processor, sampling)``: apply ``preprocessing.videos``' frame size limits to the processor in
    place. Called by ``load_processor``; None for a family that reads no video."""

    bound_images: Callable[[Any, dict], None] | None = field(default=None, repr=False)
    """``bound_images(processor, bounds)``: apply the ``preprocessing.images`` limits this family honours (its
    ``image_bound_fields``) to the processor in place, so every image is bounded before tokenisation. Called by
    ``load_processor``. None for text-only architectures."""

    image_bound_fields: tuple[str, ...] = ()
    """The ``preprocessing.images`` fields (``config.schema.ImageBounds``) that ``bound_images`` and
    ``vision_tokens_per_image`` read, e.g. ``("min_pixels", "max_pixels")``; () for text-only. A test checks that
    the registry's union is exactly ``ImageBounds``'s fields and that each field's description names its families."""

    packed_position_ids: PackedPositionsFn | None = field(default=None, repr=False)
    """``packed_position_ids(processor, rows, media, model_config)``: the position ids of several records
    concatenated into one row with no padding (``sft.padding_free``), each record positioned as if it were alone;
    ``media`` is the batch's pixel inputs (their grids), ``model_config`` the model's config.
    ``restarting_positions`` for 1-D rotary families; None for a family that is not packed (Mllama: its images
    enter through cross-attention layers whose inputs are laid out one row per record; no library packs it)."""
    vision_mlp_gated: bool | None = None
    """The vision tower's MLP is gated (SwiGLU: gate, up and down projections, as Qwen2.5-VL's) rather than two
    layers (Mllama's): the planner's vision-activation estimate. None for text-only architectures."""

    def padding_free(self, requested: bool | None) -> bool:
        """``sft.padding_free`` for this family: None packs wherever the family can; true where it cannot is a
        ConfigError naming the alternative."""
        if requested is None:
            return self.packed_position_ids is not None
        if requested and self.packed_position_ids is None:
            raise ConfigError(
                f"sft.padding_free: {self.name} records cannot be packed into one row (its images enter through "
                "cross-attention); leave it unset, and set sft.max_tokens_per_batch for batches with little padding"
            )
        return requested

    def __post_init__(self) -> None:
        image_fields = {
            "image_token": self.image_token is not None,
            "image_inputs": self.image_inputs is not None,
            "vision_mlp_gated": self.vision_mlp_gated is not None,
            "bound_images": self.bound_images is not None,
            "image_bound_fields": bool(self.image_bound_fields),
        }
        if self.is_vision:
            missing = [name for name in ("image_token", "image_inputs", "vision_mlp_gated") if not image_fields[name]]
            if missing:
                raise ValueError(f"vision architecture {self.name!r} must set {', '.join(missing)}")
            if image_fields["bound_images"] != image_fields["image_bound_fields"]:
                raise ValueError(
                    f"architecture {self.name!r}: bound_images and image_bound_fields go together (the fields it reads)"
                )
        elif any(image_fields.values()):
            present = ", ".join(name for name, value in image_fields.items() if value)
            raise ValueError(f"text-only architecture {self.name!r} sets {present}, which only vision ones may")
        unbounded = self.vision_tokens_per_image({})
        if unbounded < 0 or (unbounded > 0) != self.is_vision:
            raise ValueError(
                f"architecture {self.name!r}: vision_tokens_per_image({{}}) is {unbounded}; a vision family's "
                "default image gives its tower a positive count, a text-only family's is 0"
            )


def write_atomically(out_dir: Path, save: Callable[[Path], None]) -> Path:
    """Run ``save(staging)`` into a sibling staging dir, then swap it into ``out_dir`` atomically.

    A crash mid-build leaves at most a hidden staging directory, never a half-written model that looks valid.
    """
    out_dir = Path(out_dir)
    staged = staging_dir_for(out_dir)
    try:
        save(staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    replace_dir_atomic(staged, out_dir)
    return out_dir


def token_id(tokenizer: Any, token: str) -> int:
    """The id of a token that must exist (``convert_tokens_to_ids`` silently maps unknown ones)."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{token!r} is not a single token in this tokenizer (got ids {ids})")
    return ids[0]


@dataclass(frozen=True)
class RealCheckpointFiles:
    """One real checkpoint's published non-weight files under ``conf/model_configs/<folder>/``."""

    folder: str

    @property
    def path(self) -> Path:
        return MODEL_CONFIGS / self.folder

    def chat_template(self, name: str = "chat_template.jinja") -> str:
        return (self.path / name).read_text(encoding="utf-8")

    def json(self, name: str) -> dict[str, Any]:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    @property
    def special_tokens(self) -> dict[str, Any]:
        """bos/eos/pad/image token strings (None where the checkpoint sets none) and the stop tokens."""
        return self.json("special_tokens.json")

    def image_processor_settings(self) -> dict[str, Any]:
        """preprocessor_config.json without its class names: the keyword arguments of the image processor."""
        settings = self.json("preprocessor_config.json")
        return {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}

    def generation_config(self, tokenizer: Any) -> GenerationConfig:
        """The twin's generation settings: the published generation_config.json with its token ids mapped to
        ``tokenizer``'s by name; where none is published, the special-token table's stop tokens, greedy."""
        tokens = self.special_tokens
        if (self.path / "generation_config.json").is_file():
            names = {real_id: name for name, real_id in tokens["ids"].items()}
            settings = self.json("generation_config.json")
            settings.pop("transformers_version", None)
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = settings.get(key)
                if isinstance(value, list):
                    settings[key] = [token_id(tokenizer, names[v]) for v in value]
                elif value is not None:
                    settings[key] = token_id(tokenizer, names[value])
            return GenerationConfig(**settings)
        return GenerationConfig(
            bos_token_id=token_id(tokenizer, tokens["bos_token"]) if tokens["bos_token"] else None,
            eos_token_id=[token_id(tokenizer, name) for name in tokens["stop_tokens"]],
            pad_token_id=token_id(tokenizer, tokens["pad_token"]) if tokens["pad_token"] else None,
            do_sample=False,
        )
