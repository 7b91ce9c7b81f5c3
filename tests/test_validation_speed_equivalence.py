"""Validation's fast paths give exactly what the plain ones give: orjson's reading against json's, the digests'
hand-written canonical text against json.dumps, alpaca's direct record against the generic one. Speed itself is
measured in bench/data.py, not here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from vlm_pipeline.data import formats, validation
from vlm_pipeline.data.formats import RecordError, message_text, normalise_record, record_text_chars
from vlm_pipeline.data.validation import canonical_digest, fast_object, parse_object, record_digests, validate_lines

SHAPES = Path(__file__).resolve().parents[1] / "data/01_raw/shapes_vqa"
ALPACA = Path(__file__).resolve().parents[1] / "data/01_raw/alpaca_glossary"
BIG = b"18446744073709551616"  # one past the largest 64-bit integer: orjson reads it as a float


def alpaca(instruction="Define.", output="A word.", **extra) -> bytes:
    return json.dumps({"instruction": instruction, "output": output, **extra}).encode()


def chat(user_content, assistant_content="x", **extra) -> bytes:
    messages = [{"role": "user", "content": user_content}, {"role": "assistant", "content": assistant_content}]
    return json.dumps({"messages": messages, **extra}).encode()


TRICKY = [
    b'{"instruction": "caf\xe9", "output": "x"}',  # not UTF-8
    b'\xef\xbb\xbf{"instruction": "bom", "output": "x"}',  # a byte-order mark (allowed on line 1 only)
    b'{"instruction": "a", "output": "b", "input": NaN}',
    b'{"instruction": "a", "output": "b", "input": 1e400}',
    b'{"instruction": ' + BIG + b', "output": "b"}',
    b'{"instruction": "a", "output": "b", "input": -' + BIG + b"}",
    b'{"instruction": "a", "output": "b", "extra": ' + BIG + b"}",
    b'{"messages": [{"role": "user", "content": [{"type": "image", "index": ' + BIG + b'}]}, {"role": "assistant", '
    b'"content": "x"}], "images": ["images/train_0000.png"]}',
    b'{"conversations": [{"from": "human", "value": ' + BIG + b'}, {"from": "gpt", "value": "a"}]}',
    b'{"instruction": "a", "instruction": 1, "output": "b"}',  # duplicate keys: the last one counts
    b'{"instruction": "a", "output": "b", "deep": ' + b"[" * 250 + b"]" * 250 + b"}",
    b'{"instruction": "a\\"\\\\\\/\\b\\f\\n\\r\\t\\u0001\\u007f\\u2028\\ud83d\\ude00", "output": "b"}',
    b'{"instruction": "a", "output": "b"} x',
    b'{"instruction": "a", "output": "b",}',
    b"[1, 2]",
    b"3",
    b"{}",
    alpaca(),
    alpaca(),  # a duplicate
    alpaca(" ", "b"),
    alpaca("a", "b", input=None),
    alpaca("a <image> b", "c", input="d"),
    chat("q <image>", images=["images/train_0001.png"]),
    chat(
        [{"type": "text", "text": "q"}, {"type": "image", "index": 1}, {"type": "image", "index": 0}],
        images=["images/train_0002.png", "images/train_0003.png"],
    ),
    chat("q", "   "),
    chat(5),
]


# json reads a lone surrogate, orjson does not; parse_object then sets the record aside (not_utf8).
LONE_SURROGATE = b'{"instruction": "\\ud800", "output": "x"}'


def corpus(seed: int = 0, count: int = 300) -> list[bytes]:
    """The sample files' lines, the tricky ones, and random mutations of both (cut, byte changes, swapped values)."""
    rng = random.Random(seed)
    seeds = [line for folder in (SHAPES, ALPACA) for line in (folder / "train.jsonl").read_bytes().splitlines()[:40]]
    lines = list(TRICKY)
    for _ in range(count):
        line = rng.choice(seeds + TRICKY)
        position = rng.randrange(len(line) + 1)
        choice = rng.randrange(4)
        if choice == 0:
            line = line[:position]
        elif choice == 1:
            line = line[:position] + bytes([rng.choice(b'"{}[],:\\ \x00\xff0')]) + line[position + 1 :]
        elif choice == 2:
            line = line.replace(b'"text"', rng.choice([b"null", b"7", BIG, b'""', b"[]", b'"image"']), 1)
        lines.append(line)
    return lines


def test_orjson_reads_every_object_as_json_does_or_leaves_it_to_json():
    assert fast_object(LONE_SURROGATE) is None
    with pytest.raises(RecordError, match="not_utf8: a .* escape is a lone surrogate"):
        parse_object(LONE_SURROGATE)
    too_deep = b'{"instruction": "a", "output": "b", "deep": ' + b"[" * 990 + b"]" * 990 + b"}"
    with pytest.raises(RecordError, match="not_json: nested deeper"):  # orjson reads it: json's limit decides
        parse_object(too_deep)
    assert fast_object(too_deep) is None
    for line in corpus():
        fast = fast_object(line)
        if fast is None or BIG in line:  # beyond 64 bits: see test_validation_gives_what_json_alone_gives
            continue
        assert repr(fast) == repr(parse_object(line)), line  # repr: a float is not taken for an equal int


@pytest.mark.parametrize("order", ["as_is", "alpaca_first", "shuffled"])
def test_validation_gives_what_json_alone_gives(order, monkeypatch):
    lines = corpus(seed=1)
    if order == "alpaca_first":
        lines = [alpaca()] + lines
    elif order == "shuffled":
        random.Random(2).shuffle(lines)
    fast = validate_lines(lines, SHAPES, max_image_pixels=10**6)
    monkeypatch.setattr(validation, "fast_object", lambda line: None)
    plain = validate_lines(lines, SHAPES, max_image_pixels=10**6)
    assert json.dumps([fast.valid, fast.quarantine, fast.report]) == json.dumps(
        [plain.valid, plain.quarantine, plain.report]
    )
    assert fast.quarantine, "the corpus has bad lines"


def normalised_records() -> list[dict]:
    records = []
    for line in corpus(seed=3, count=600):
        try:
            raw = json.loads(line)
            records.append(normalise_record(raw) if isinstance(raw, dict) else None)
        except (RecordError, ValueError):
            continue
    return [record for record in records if record is not None]


def test_record_digests_hash_the_text_json_dumps_writes():
    records = normalised_records()
    assert len(records) > 100 and any(record["images"] for record in records)
    for record in records:
        names = [f'images/{i}-\u00e9"\\.png' for i, _ in enumerate(record["images"])]
        hashes = [f"{i:064x}" for i, _ in enumerate(record["images"])]
        expected = (
            canonical_digest({"messages": record["messages"], "images": names}),
            canonical_digest({"prompt": record["messages"][:-1], "images": hashes}),
        )
        assert record_digests(record["messages"], names, hashes) == expected


def test_an_unexpected_part_or_turn_is_still_digested_by_json():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "q", "extra": 1}, {"type": "image", "index": 0}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}], "name": "bot"},
    ]
    expected = canonical_digest({"messages": messages, "images": []})
    assert record_digests(messages, [], [])[0] == expected


def test_alpaca_records_are_the_ones_the_generic_path_makes():
    for line in corpus(seed=4):
        try:
            raw = json.loads(line)
            direct = formats.normalise_alpaca(raw)
        except (RecordError, ValueError, TypeError, AttributeError):
            continue
        prompt, output = (part["text"] for message in direct["messages"] for part in message["content"])
        turns = [("user", [{"type": "text", "text": prompt}]), ("assistant", [{"type": "text", "text": output}])]
        assert direct == formats._finish(turns, field_images=[], inline={"image": [], "video": []}, record={})


def test_text_chars_count_the_joined_texts():
    for record in normalised_records():
        assert record_text_chars(record) == sum(len(message_text(message)) for message in record["messages"])
