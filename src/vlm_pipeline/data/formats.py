"""Recognise a raw record's format and normalise it to the one shape the rest of the pipeline reads.

Two input formats are accepted:

* conversational: ``{"messages": [{"role": ..., "content": ...}, ...], "images": ["images/x.png", ...]}``,
  where ``content`` is a string or a list of ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` parts
  and ``images`` (optional) lists paths relative to the data folder, one per image part, in order;
* alpaca: ``{"instruction": str, "input": str (optional), "output": str}``.

The normalised record is always ``{"messages": [...], "images": [...]}`` with list-of-parts content, so later
stages handle one shape only. Problems raise :class:`RecordError` carrying a stable reason code.
"""

from __future__ import annotations

from typing import Any

CONVERSATIONAL = "conversational"
ALPACA = "alpaca"
ROLES = ("system", "user", "assistant")

# Reason codes for a record's structure. validation.py adds the byte, JSON and image codes and documents
# all of them in its REASONS table; they live here so this module does not import validation.py.
UNKNOWN_FORMAT = "unknown_format"
MISSING_FIELD = "missing_field"
BAD_MESSAGES = "bad_messages"
UNKNOWN_ROLE = "unknown_role"
NO_ASSISTANT_TURN = "no_assistant_turn"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"


class RecordError(ValueError):
    """A record that cannot be normalised: ``reason`` is a stable code, ``detail`` a sentence for people."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def detect_format(record: dict) -> str | None:
    """``"conversational"``, ``"alpaca"`` or None, judged by which top-level keys the record has."""
    if "messages" in record:
        return CONVERSATIONAL
    if "instruction" in record or "output" in record:
        return ALPACA
    return None


def normalise_record(record: dict) -> dict:
    """The record as ``{"messages": [...], "images": [...]}``, or :class:`RecordError` saying why not."""
    record_format = detect_format(record)
    if record_format == CONVERSATIONAL:
        return normalise_conversational(record)
    if record_format == ALPACA:
        return normalise_alpaca(record)
    keys = ", ".join(sorted(str(key) for key in record)[:8]) or "none"
    raise RecordError(
        UNKNOWN_FORMAT,
        f"expected a 'messages' list (conversational) or 'instruction' and 'output' (alpaca); found keys: {keys}",
    )


def normalise_alpaca(record: dict) -> dict:
    """One user turn (instruction, then the input after a blank line if any) and one assistant turn."""
    instruction = _required_text(record, "instruction")
    output = _required_text(record, "output")
    extra_input = record.get("input")
    if extra_input is None:
        extra_input = ""
    if not isinstance(extra_input, str):
        raise RecordError(MISSING_FIELD, f"input is {_type_name(extra_input)}; expected a string (it may be empty)")
    prompt = instruction + ("\n\n" + extra_input if extra_input else "")
    return {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": output}]},
        ],
        "images": [],
    }


def normalise_conversational(record: dict) -> dict:
    """Messages with list-of-parts content, ending in an assistant turn, and exactly one path per image part."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError(BAD_MESSAGES, f"messages is {_type_name(messages)}; expected a non-empty list of turns")
    normalised = [_normalise_message(message, index) for index, message in enumerate(messages)]
    if normalised[-1]["role"] != "assistant":
        roles = [message["role"] for message in normalised]
        detail = (
            "messages has no assistant turn"
            if "assistant" not in roles
            else f"the last turn, messages[{len(normalised) - 1}], is {normalised[-1]['role']!r}; expected 'assistant'"
        )
        raise RecordError(NO_ASSISTANT_TURN, detail)
    if not message_text(normalised[-1]).strip():
        raise RecordError(MISSING_FIELD, f"messages[{len(normalised) - 1}] (the final assistant turn) has no text")
    images = _normalise_images(record.get("images"))
    image_parts = count_image_parts(normalised)
    if image_parts != len(images):
        raise RecordError(
            IMAGE_COUNT_MISMATCH,
            f"messages have {image_parts} image part(s) but images lists {len(images)} path(s)",
        )
    return {"messages": normalised, "images": images}


def count_image_parts(messages: list[dict]) -> int:
    """How many ``{"type": "image"}`` parts the (normalised) messages hold."""
    return sum(part["type"] == "image" for message in messages for part in message["content"])


def message_text(message: dict) -> str:
    """The text parts of one normalised message, joined."""
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def record_text_chars(record: dict) -> int:
    """Characters of text over all turns of a normalised record (for the validation report)."""
    return sum(len(message_text(message)) for message in record["messages"])


def _normalise_message(message: Any, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RecordError(BAD_MESSAGES, f"{where} is {_type_name(message)}; expected an object with role and content")
    role = message.get("role")
    if role is None:
        raise RecordError(MISSING_FIELD, f"{where}.role is missing")
    if role not in ROLES:
        raise RecordError(UNKNOWN_ROLE, f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
    content = _normalise_content(message.get("content"), f"{where}.content")
    if not any(part["type"] == "image" or part["text"].strip() for part in content):
        raise RecordError(MISSING_FIELD, f"{where}.content has no text and no image")
    return {"role": role, "content": content}


def _normalise_content(content: Any, where: str) -> list[dict]:
    """A string becomes one text part; a list keeps its parts, reduced to ``type`` and ``text``."""
    if content is None:
        raise RecordError(MISSING_FIELD, f"{where} is missing")
    if isinstance(content, str):
        if not content.strip():
            raise RecordError(MISSING_FIELD, f"{where} is empty")
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RecordError(BAD_MESSAGES, f"{where} is {_type_name(content)}; expected a string or a list of parts")
    if not content:
        raise RecordError(MISSING_FIELD, f"{where} is an empty list")
    return [_normalise_part(part, f"{where}[{index}]") for index, part in enumerate(content)]


def _normalise_part(part: Any, where: str) -> dict:
    # Image parts drop any inline payload: the record's "images" list is the one source of image paths.
    if isinstance(part, dict) and part.get("type") == "image":
        return {"type": "image"}
    if isinstance(part, dict) and part.get("type") == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise RecordError(MISSING_FIELD, f"{where}.text is {_type_name(text)}; expected a string")
        return {"type": "text", "text": text}
    found = f"type {part.get('type')!r}" if isinstance(part, dict) else _type_name(part)
    raise RecordError(BAD_MESSAGES, f"{where} has {found}; expected a {{'type': 'text'}} or {{'type': 'image'}} part")


def _normalise_images(images: Any) -> list[str]:
    if images is None:
        return []
    if not isinstance(images, list):
        raise RecordError(MISSING_FIELD, f"images is {_type_name(images)}; expected a list of relative paths")
    for index, path in enumerate(images):
        if not isinstance(path, str) or not path.strip():
            raise RecordError(MISSING_FIELD, f"images[{index}] is {_type_name(path)}; expected a non-empty path")
    return list(images)


def _required_text(record: dict, field: str) -> str:
    """An alpaca field that must be a non-empty string (never null: a null output would train on nothing)."""
    if field not in record:
        raise RecordError(MISSING_FIELD, f"{field} is missing")
    value = record[field]
    if not isinstance(value, str):
        raise RecordError(MISSING_FIELD, f"{field} is {_type_name(value)}; expected a non-empty string")
    if not value.strip():
        raise RecordError(MISSING_FIELD, f"{field} is empty")
    return value


def _type_name(value: Any) -> str:
    """How a JSON value reads in a message: 'null', 'an empty string', 'a number (3)', 'a list', ..."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
