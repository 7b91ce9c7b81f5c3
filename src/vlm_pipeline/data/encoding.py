"""Turn a validated record into model inputs with the model's own chat template and processor.

Labels are exactly the assistant turns: the chat templates mark each assistant turn (its text and its
end-of-turn token) with ``{% generation %}``, and transformers returns that span as ``assistant_masks``.
Everything else (system, user, image and pad tokens) is -100.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

IGNORE_INDEX = -100


def load_images(record: dict, image_root: Path) -> list[Image.Image]:
    """The record's images as RGB PIL images (paths were checked to lie inside ``image_root``)."""
    images = []
    for relative in record.get("images", []):
        with Image.open(image_root / relative) as image:
            images.append(image.convert("RGB"))
    return images


def attach_images(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """Copy of ``messages`` whose ``{"type": "image"}`` parts carry the images, in order."""
    remaining = iter(images)
    attached = []
    for message in messages:
        parts = []
        for part in message["content"]:
            if part.get("type") == "image":
                part = {"type": "image", "image": next(remaining)}
            parts.append(part)
        attached.append({"role": message["role"], "content": parts})
    return attached


def encode_messages(processor: Any, messages: list[dict], images: list[Image.Image]) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` for one conversation, image placeholders expanded by the processor."""
    encoded = processor.apply_chat_template(
        attach_images(messages, images) if images else messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    input_ids = _first_row(encoded["input_ids"])
    mask = _first_row(encoded["assistant_masks"])
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask, strict=True)]
    return {"input_ids": input_ids, "labels": labels}


def prompt_messages(record: dict) -> list[dict]:
    """The conversation up to (not including) its final assistant turn: what the model is asked."""
    return record["messages"][:-1]


def reference_answer(record: dict) -> str:
    """The text of the final assistant turn."""
    return message_text(record["messages"][-1])


def message_text(message: dict) -> str:
    return "".join(part.get("text", "") for part in message["content"] if part.get("type") == "text")


def _first_row(values: Any) -> list[int]:
    # Processors return a batch of one ([[...]]); tokenizers return a flat list for one conversation.
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    return list(values[0]) if values and isinstance(values[0], list) else values
