"""Supported model families: one module each, a registry, and the loaders every stage uses.

Each module builds a tiny randomly initialised model of the real architecture (locally trained tokenizer, the
real processor classes, a chat template) that loads through the same ``from_pretrained`` path as a real
checkpoint, so the whole pipeline runs offline on a laptop and unchanged on a real model directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, AutoTokenizer

from vlm_pipeline.architectures import llama, mllama, qwen2_5_vl
from vlm_pipeline.architectures.base import Architecture
from vlm_pipeline.config.schema import PreprocessingParams
from vlm_pipeline.data.labels import ChatEncoder
from vlm_pipeline.model_files import check_loading_info

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture_for_model",
    "get_architecture",
    "load_chat_encoder",
    "load_model",
    "load_processor",
]

ARCHITECTURES: dict[str, Architecture] = {
    module.ARCHITECTURE.name: module.ARCHITECTURE for module in (qwen2_5_vl, mllama, llama)
}


def get_architecture(name: str) -> Architecture:
    """The architecture registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; expected one of: {', '.join(ARCHITECTURES)}") from None


def architecture_for_model(model_dir: str | Path) -> Architecture:
    """The architecture of a saved model, judged by ``model_type`` in its ``config.json``."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {model_dir} a saved model directory?")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    for architecture in ARCHITECTURES.values():
        if architecture.model_type == model_type:
            return architecture
    known = ", ".join(a.model_type for a in ARCHITECTURES.values())
    raise ValueError(f"{config_path}: model_type {model_type!r} is not supported (supported: {known})")


def load_processor(
    model_dir: str | Path,
    *,
    image_bounds: dict | None = None,
    video_sampling: dict | None = None,
    chat_template: str | Path | None = None,
    architecture: Architecture | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """``AutoProcessor`` for a vision model, ``AutoTokenizer`` for a text-only one, ready to pad.

    ``image_bounds`` (``preprocessing.images``; the family reads its ``image_bound_fields``, None values keep the
    checkpoint's) are applied to the image processor, and ``video_sampling`` (``preprocessing.videos``) to the video
    processor, so preprocessing, training and evaluation see the same sizes.
    ``chat_template`` (``preprocessing.chat_template``, a .jinja file) replaces the checkpoint's template.
    A tokenizer without a pad token gets one from its own vocabulary (see ``ensure_pad_token``).
    ``architecture`` is read from ``model_dir``'s config.json unless given (an adapter directory has none).
    """
    architecture = architecture or architecture_for_model(model_dir)
    loader = AutoProcessor if architecture.is_vision else AutoTokenizer
    processor = loader.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if image_bounds and architecture.bound_images is not None:
        architecture.bound_images(processor, image_bounds)
    if architecture.bound_videos is not None:
        architecture.bound_videos(processor, video_sampling or {})
    tokenizer = getattr(processor, "tokenizer", processor)
    if chat_template is not None:
        template = Path(chat_template).read_text(encoding="utf-8")
        processor.chat_template = template
        tokenizer.chat_template = template
    ensure_pad_token(tokenizer, architecture, model_dir)
    return processor


def ensure_pad_token(tokenizer: Any, architecture: Architecture, model_dir: str | Path) -> None:
    """Give a tokenizer that sets no pad token (Llama 3.1 Instruct) one it already has: the family's reserved
    fine-tune pad token where the vocabulary holds it, else EOS. Never a new token: embeddings keep their size.
    Padding is masked out of attention and labels, so which token it is changes no result."""
    if tokenizer.pad_token is not None:
        return
    reserved = architecture.fine_tune_pad_token
    choice = reserved if reserved and reserved in tokenizer.get_vocab() else tokenizer.eos_token
    tokenizer.pad_token = choice
    logger.info("%s sets no pad token; padding with %s (id %d)", model_dir, choice, tokenizer.pad_token_id)


def load_chat_encoder(
    model_dir: str | Path, preprocessing: PreprocessingParams, *, trust_remote_code: bool = False
) -> ChatEncoder:
    """The processor with ``preprocessing``'s image bounds and chat template, plus its template variables."""
    architecture = architecture_for_model(model_dir)
    processor = load_processor(
        model_dir,
        image_bounds=preprocessing.images.model_dump(),
        video_sampling=preprocessing.videos.model_dump(),
        chat_template=preprocessing.chat_template,
        architecture=architecture,
        trust_remote_code=trust_remote_code,
    )
    return ChatEncoder(processor, architecture.end_of_turn_token, dict(preprocessing.template_kwargs))


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    attn_implementation: str = "sdpa",
) -> Any:
    """The model through its architecture's real class, from safetensors only (never pickled weights).

    ``dtype`` and ``attn_implementation`` are the ``model`` parameter group's (``"auto"``: the checkpoint's
    dtype). ``quantization_config`` (a ``BitsAndBytesConfig``) loads the base quantized, for LoRA/QLoRA training.
    """
    model_class = architecture_for_model(model_dir).model_class
    model, info = model_class.from_pretrained(
        str(model_dir),
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        quantization_config=quantization_config,
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    check_loading_info(Path(model_dir), info)  # transformers fills a missing tensor at random and only warns
    return model
