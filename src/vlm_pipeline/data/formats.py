"""Recognise a raw record's format and normalise it to the one shape the rest of the pipeline reads.

Three families of JSONL are accepted, told apart by their top-level keys:

* ``messages`` (ours, TRL, OpenAI): ``{"messages": [{"role": ..., "content": ...}, ...], "images": [...]}``.
  ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``, ``{"type": "image"}`` (which
  takes the next entry of ``images``, or ``images[index]`` when the part has an integer ``index``, as in
  HuggingFaceH4/llava-instruct-mix-vsft), an image part carrying its own ``image``/``url``/``path``, or OpenAI's
  ``{"type": "image_url", "image_url": {"url": ...}}``. TRL's single ``image`` column is read as ``images``.
* ``conversations`` (LLaVA, ShareGPT, LLaMA-Factory): ``{"conversations": [{"from": "human"|"gpt"|"system",
  "value": ...}], "image": ...}`` with the images in ``image`` (a string or a list) or ``images``. Other role
  names are mapped (``CONVERSATION_ROLES``) or rejected by name; a top-level ``system`` string is the system turn.
* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``.

In any text, an ``<image>`` placeholder is an image part at exactly that position (nothing is moved to the front
of a turn, nothing is added). The placeholders and image parts must match the listed images one to one.

Video comes the same way (TRL's and Qwen's convention, and LLaMA-Factory's): ``{"type": "video"}`` parts (the next
entry of ``videos``, ``videos[index]``, or a part carrying its own ``video``/``path``) or ``<video>`` placeholders,
matched one to one with the record's ``videos`` (or ``video``) list. A video is a clip file or a folder of frame
images. Audio (an ``audios``/``audio`` field, an audio part, an ``<audio>`` placeholder) is refused by name, and so
is any media in an alpaca record, which has no place for it: nothing a record carries is dropped silently.

The normalised record is ``{"messages": [...], "images": [...]}`` with list-of-parts content, plus ``"videos":
[...]`` when it has any (so a record without video is the same bytes as before video existed). Its ``images`` and
``videos`` are references as written (a relative path, a ``file://`` or ``data:`` URI, or a remote URL):
:mod:`vlm_pipeline.data.validation` resolves them inside the data folder. Problems raise :class:`RecordError`
carrying a stable reason code.
"""

from __future__ import annotations

import re
from typing import Any

MESSAGES = "messages"
CONVERSATIONS = "conversations"
ALPACA = "alpaca"
# What a report says about a detected format.
FORMAT_NAMES = {
    MESSAGES: "messages (ours, TRL, OpenAI image_url)",
    CONVERSATIONS: "conversations (LLaVA, ShareGPT)",
    ALPACA: "alpaca",
}
ROLES = ("system", "user", "assistant")
# The role names of the LLaVA / ShareGPT dialects. Tool-calling turns (function_call, observation, tool) have no
# place in a chat-template SFT record, so they are rejected by name rather than guessed at.
CONVERSATION_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
AUDIO_PLACEHOLDER = "<audio>"
# Each media kind: its placeholder and the record fields that list it (the first name is the normalised one).
MEDIA_PLACEHOLDERS = {IMAGE_PLACEHOLDER: "image", VIDEO_PLACEHOLDER: "video"}
_PLACEHOLDER_SPLIT = re.compile("(" + "|".join(map(re.escape, [*MEDIA_PLACEHOLDERS, AUDIO_PLACEHOLDER])) + ")")
AUDIO_FIELDS = ("audios", "audio")
AUDIO_PARTS = ("audio", "input_audio", "audio_url")
MEDIA_FIELDS = ("images", "image", "videos", "video", *AUDIO_FIELDS)

# Reason codes for a record's structure. validation.py adds the byte, JSON and image codes and documents
# all of them in its REASONS table; they live here so this module does not import validation.py.
UNKNOWN_FORMAT = "unknown_format"
MISSING_FIELD = "missing_field"
BAD_MESSAGES = "bad_messages"
UNKNOWN_ROLE = "unknown_role"
NO_ASSISTANT_TURN = "no_assistant_turn"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
VIDEO_COUNT_MISMATCH = "video_count_mismatch"
AUDIO_UNSUPPORTED = "audio_unsupported"
ALPACA_MEDIA = "alpaca_media"


class RecordError(ValueError):
    """A record that cannot be normalised: ``reason`` is a stable code, ``detail`` a sentence for people."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def detect_format(record: dict) -> str | None:
    """``"messages"``, ``"conversations"``, ``"alpaca"`` or None, judged by the record's top-level keys."""
    if "messages" in record:
        return MESSAGES
    if "conversations" in record:
        return CONVERSATIONS
    if "instruction" in record or "output" in record:
        return ALPACA
    return None


def normalise_record(record: dict) -> dict:
    """The record as ``{"messages": [...], "images": [...]}`` (and ``"videos"``), or :class:`RecordError` saying
    why not."""
    _refuse_audio(record)
    record_format = detect_format(record)
    if record_format == MESSAGES:
        return normalise_messages(record)
    if record_format == CONVERSATIONS:
        return normalise_conversations(record)
    if record_format == ALPACA:
        return normalise_alpaca(record)
    keys = ", ".join(sorted(str(key) for key in record)[:8]) or "none"
    raise RecordError(
        UNKNOWN_FORMAT,
        "expected 'messages' (ours, TRL, OpenAI), 'conversations' (LLaVA, ShareGPT) or 'instruction' and "
        f"'output' (alpaca); found keys: {keys}",
    )


def normalise_alpaca(record: dict) -> dict:
    """One user turn (instruction, then the input after a blank line if any) and one assistant turn."""
    _refuse_alpaca_media(record)
    instruction = _required_text(record, "instruction")
    output = _required_text(record, "output")
    extra_input = record.get("input")
    if extra_input is None:
        extra_input = ""
    if not isinstance(extra_input, str):
        raise RecordError(MISSING_FIELD, f"input is {_type_name(extra_input)}; expected a string (it may be empty)")
    prompt = instruction + ("\n\n" + extra_input if extra_input else "")
    # The record _finish would make: both texts are non-blank, the last turn is the assistant's, alpaca has no
    # images and its text is never split at <image>. Built directly, as most of our text data is alpaca.
    messages = [
        {"role": "user", "content": [{"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": output}]},
    ]
    return {"messages": messages, "images": []}


def normalise_messages(record: dict) -> dict:
    """Messages with list-of-parts content (ours, TRL, OpenAI), ending in an assistant turn."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError(BAD_MESSAGES, f"messages is {_type_name(messages)}; expected a non-empty list of turns")
    inline: dict[str, list[str]] = {"image": [], "video": []}
    turns = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RecordError(
                BAD_MESSAGES, f"{where} is {_type_name(message)}; expected an object with role and content"
            )
        role = message.get("role")
        if role is None:
            raise RecordError(MISSING_FIELD, f"{where}.role is missing")
        if role not in ROLES:
            raise RecordError(UNKNOWN_ROLE, f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
        turns.append((role, _content_parts(message.get("content"), f"{where}.content", inline)))
    return _finish(turns, _media_fields(record, "image"), inline, record)


def normalise_conversations(record: dict) -> dict:
    """LLaVA / ShareGPT turns of ``{"from", "value"}`` (or ``{"role", "content"}``), roles mapped to ours."""
    conversations = record["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise RecordError(
            BAD_MESSAGES, f"conversations is {_type_name(conversations)}; expected a non-empty list of turns"
        )
    turns = []
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise RecordError(MISSING_FIELD, f"system is {_type_name(system)}; expected a string")
        if system.strip():
            turns.append(("system", _text_parts(system)))
    for index, turn in enumerate(conversations):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise RecordError(BAD_MESSAGES, f"{where} is {_type_name(turn)}; expected an object with from and value")
        speaker = turn.get("from", turn.get("role"))
        if speaker is None:
            raise RecordError(MISSING_FIELD, f"{where}.from is missing")
        if not isinstance(speaker, str):
            raise RecordError(MISSING_FIELD, f"{where}.from is {_type_name(speaker)}; expected a string")
        if speaker not in CONVERSATION_ROLES:
            raise RecordError(
                UNKNOWN_ROLE,
                f"{where}.from is {speaker!r}; expected one of {', '.join(CONVERSATION_ROLES)} "
                "(tool-calling turns are not supported)",
            )
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise RecordError(MISSING_FIELD, f"{where}.value is {_type_name(value)}; expected a string")
        turns.append((CONVERSATION_ROLES[speaker], _text_parts(value)))
    return _finish(turns, _media_fields(record, "image"), {"image": [], "video": []}, record)


def count_image_parts(messages: list[dict]) -> int:
    """How many ``{"type": "image"}`` parts the (normalised) messages hold."""
    return sum(part["type"] == "image" for message in messages for part in message["content"])


def record_videos(record: dict) -> list[str]:
    """A normalised record's videos (the key is there only when it has some)."""
    return record.get("videos", [])


def message_text(message: dict) -> str:
    """The text parts of one normalised message, joined."""
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def record_text_chars(record: dict) -> int:
    """Characters of text over all turns of a normalised record (for the validation report)."""
    # Summed part by part: the same count as joining each message's text first, without building the strings.
    parts = [part for message in record["messages"] for part in message["content"]]
    return sum([len(part["text"]) for part in parts if part["type"] == "text"])


# ---- shared steps -------------------------------------------------------------------------------
# While parsing, an image or video part is {"type": kind, "slot": ...}: an int (that entry of the record's field
# for that kind), None (the next unindexed entry) or ("inline", n) (the n-th reference of that kind carried by the
# parts themselves).


def _finish(
    turns: list[tuple[str, list[dict]]], field_images: list[str], inline: dict[str, list[str]], record: dict
) -> dict:
    """Check the turns, then give every image and video part its reference, in order of appearance."""
    for index, (_, parts) in enumerate(turns):
        if not any(part["type"] != "text" or part["text"].strip() for part in parts):
            raise RecordError(MISSING_FIELD, f"turn {index} has no text and no image")
    roles = [role for role, _ in turns]
    if roles[-1] != "assistant":
        detail = (
            "the conversation has no assistant turn"
            if "assistant" not in roles
            else f"the last turn (turn {len(turns) - 1}) is {roles[-1]!r}; expected 'assistant'"
        )
        raise RecordError(NO_ASSISTANT_TURN, detail)
    if not "".join(part.get("text", "") for part in turns[-1][1]).strip():
        raise RecordError(MISSING_FIELD, f"turn {len(turns) - 1} (the final assistant turn) has no text")
    every_part = [part for _, parts in turns for part in parts]
    images = _assign(every_part, "image", field_images, inline["image"], IMAGE_COUNT_MISMATCH)
    videos = _assign(every_part, "video", _media_fields(record, "video"), inline["video"], VIDEO_COUNT_MISMATCH)
    messages = [
        {"role": role, "content": [{"type": part["type"]} if "slot" in part else part for part in parts]}
        for role, parts in turns
    ]
    return {"messages": messages, "images": images, **({"videos": videos} if videos else {})}


def _assign(parts: list[dict], kind: str, listed: list[str], inline: list[str], mismatch: str) -> list[str]:
    """The references of the ``kind`` parts in order: from the record's list (in turn, or by index) or inline."""
    slots = [part["slot"] for part in parts if part["type"] == kind]
    from_field = [slot for slot in slots if not isinstance(slot, tuple)]
    if len(from_field) != len(listed):
        raise RecordError(
            mismatch,
            f"the messages have {len(from_field)} <{kind}> placeholder(s) or {kind} part(s) but the record lists "
            f"{len(listed)} {kind}(s)",
        )
    indexed = [slot for slot in from_field if slot is not None]
    for index in indexed:
        if not 0 <= index < len(listed):
            raise RecordError(mismatch, f"a {kind} part has index {index} but the record lists {len(listed)} {kind}(s)")
    if len(set(indexed)) != len(indexed):
        raise RecordError(mismatch, f"two {kind} parts name the same {kind} index")
    unindexed = iter([index for index in range(len(listed)) if index not in set(indexed)])
    references = []
    for slot in slots:
        if isinstance(slot, tuple):
            references.append(inline[slot[1]])
        else:
            references.append(listed[next(unindexed) if slot is None else slot])
    return references


def _text_parts(text: str) -> list[dict]:
    """A text with its ``<image>`` and ``<video>`` placeholders as parts, in place (empty text pieces are
    dropped); an ``<audio>`` placeholder is refused."""
    parts = []
    for piece in _PLACEHOLDER_SPLIT.split(text):
        if piece in MEDIA_PLACEHOLDERS:
            parts.append({"type": MEDIA_PLACEHOLDERS[piece], "slot": None})
        elif piece == AUDIO_PLACEHOLDER:
            raise RecordError(
                AUDIO_UNSUPPORTED, f"a turn holds an {AUDIO_PLACEHOLDER} placeholder; no model here reads audio"
            )
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _content_parts(content: Any, where: str, inline: dict[str, list[str]]) -> list[dict]:
    """A string, or a list of text / image / image_url parts, as parts (placeholders split out)."""
    if content is None:
        raise RecordError(MISSING_FIELD, f"{where} is missing")
    if isinstance(content, str):
        if not content.strip():
            raise RecordError(MISSING_FIELD, f"{where} is empty")
        return _text_parts(content)
    if not isinstance(content, list):
        raise RecordError(BAD_MESSAGES, f"{where} is {_type_name(content)}; expected a string or a list of parts")
    if not content:
        raise RecordError(MISSING_FIELD, f"{where} is an empty list")
    parts = []
    for index, part in enumerate(content):
        parts.extend(_content_part(part, f"{where}[{index}]", inline))
    return parts


def _content_part(part: Any, where: str, inline: dict[str, list[str]]) -> list[dict]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise RecordError(MISSING_FIELD, f"{where}.text is {_type_name(text)}; expected a string")
        return _text_parts(text)
    if kind in ("image", "video"):
        reference = next((part[key] for key in (kind, "url", "path") if isinstance(part.get(key), str)), None)
        if reference is not None:
            inline[kind].append(reference)
            return [{"type": kind, "slot": ("inline", len(inline[kind]) - 1)}]
        index = part.get("index")
        if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
            raise RecordError(BAD_MESSAGES, f"{where}.index is {_type_name(index)}; expected an integer or null")
        return [{"type": kind, "slot": index}]
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str) or not url.strip():
            raise RecordError(MISSING_FIELD, f"{where}.image_url.url is {_type_name(url)}; expected a URL or path")
        inline["image"].append(url)
        return [{"type": "image", "slot": ("inline", len(inline["image"]) - 1)}]
    if kind in AUDIO_PARTS:
        raise RecordError(AUDIO_UNSUPPORTED, f"{where} is an {kind!r} part; no model here reads audio")
    found = f"type {kind!r}" if isinstance(part, dict) else _type_name(part)
    raise RecordError(BAD_MESSAGES, f"{where} has {found}; expected a 'text', 'image', 'image_url' or 'video' part")


def _refuse_audio(record: dict) -> None:
    """A record that lists audio is set aside whole: none of our families reads it, and its text would train on
    answers about sounds the model never heard."""
    field = next((name for name in AUDIO_FIELDS if record.get(name) not in (None, [], "")), None)
    if field is not None:
        raise RecordError(AUDIO_UNSUPPORTED, f"the record has {field!r}; no model here reads audio")


def _refuse_alpaca_media(record: dict) -> None:
    """Alpaca has no parts and no placeholders: a media field, or a placeholder in its text, would be dropped or
    trained as words."""
    field = next((name for name in MEDIA_FIELDS if record.get(name) not in (None, [], "")), None)
    if field is not None:
        raise RecordError(
            ALPACA_MEDIA, f"an alpaca record has {field!r}; alpaca is text only: write it as messages or conversations"
        )
    for key in ("instruction", "input", "output"):
        value = record.get(key)
        placeholder = next((p for p in (*MEDIA_PLACEHOLDERS, AUDIO_PLACEHOLDER) if p in str(value or "")), None)
        if placeholder is not None:
            raise RecordError(
                ALPACA_MEDIA,
                f"{key} holds a {placeholder} placeholder; alpaca is text only: write it as messages or conversations",
            )


def _media_fields(record: dict, kind: str) -> list[str]:
    """The record's references of one kind from its plural or singular field (a string is one reference)."""
    names = (f"{kind}s", kind)
    present = [name for name in names if record.get(name) is not None]
    if len(present) > 1:
        raise RecordError(BAD_MESSAGES, f"both {' and '.join(present)} are set; give the {kind}s in one of them")
    if not present:
        return []
    name = present[0]
    references = record[name]
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, list):
        raise RecordError(MISSING_FIELD, f"{name} is {_type_name(references)}; expected a list of relative paths")
    for index, path in enumerate(references):
        if not isinstance(path, str) or not path.strip():
            raise RecordError(MISSING_FIELD, f"{name}[{index}] is {_type_name(path)}; expected a non-empty path")
    return list(references)


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
