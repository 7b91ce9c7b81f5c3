"""The cheap label path (one processor call per record, the shorter renderings tokenized from text with the images'
placeholder runs copied from it) gives exactly the reference path's rows (every rendering through the processor):
the same input_ids, labels and set-aside reasons, on every raw set, the multi-turn, LLaVA, mixed and token-merge
records the other tests use, for every architecture's tiny twin and for the real 128k/152k vocabularies."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, chat_encoder
from PIL import Image
from real_tokenizers import real_processor
from test_encoding import multi_turn
from test_labels import ANSWERS, CASES, DATE, conversation
from test_mixed_modality import mixed_records

from vlm_pipeline.architectures import ARCHITECTURES
from vlm_pipeline.data.encoding import encode_record
from vlm_pipeline.data.formats import normalise_record
from vlm_pipeline.data.labels import ChatEncoder, PlaceholderRuns
from vlm_pipeline.data.validation import validate_lines

RAW = PROJECT_ROOT / "data/01_raw"
SHAPES = RAW / "shapes_vqa"


def llava_records() -> list[dict]:
    """``<image>`` placeholders as users bring them: one record with an image mid-sentence in a later turn."""

    def record(later: str, images: list[str]) -> dict:
        questions = ["<image>\nDescribe the picture.", later, "Are they small?"]
        pairs = zip(questions, ANSWERS, strict=True)
        turns = [turn for q, a in pairs for turn in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        return {**normalise_record({"conversations": turns, "image": images}), "source_line": 1}

    return [
        record("How many shapes are in <image> this one?", ["images/train_0000.png", "images/train_0001.png"]),
        record("How many shapes are there?", ["images/train_0000.png"]),
    ]


def record_sets() -> dict[str, list[dict]]:
    sets = {}
    for dataset in ("shapes_vqa", "alpaca_glossary"):
        for split in ("train", "test"):
            lines = (RAW / dataset / f"{split}.jsonl").read_bytes().splitlines()
            sets[f"{dataset}/{split}"] = validate_lines(lines, SHAPES, max_image_pixels=10**8).valid
    sets["multi_turn"] = [multi_turn(True), multi_turn(False)]
    sets["three_turns"] = [conversation(**shape) for _, shape in CASES] + [conversation(system=True, images=[1, 1, 1])]
    sets["llava"] = llava_records()
    sets["mixed"] = mixed_records()
    merging = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello"}]  # TurnBoundaryMerge
    sets["token_merge"] = [{**normalise_record({"messages": merging}), "source_line": 3}]
    return sets


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    return record_sets()


def outcome(encoder: ChatEncoder, record: dict) -> tuple:
    try:
        row = encode_record(
            encoder, record, SHAPES, max_length=4096, train_on="all_assistant_turns", truncate_text_only=False
        )
    except Exception as error:  # noqa: BLE001 - an error must be the same error on both paths
        return ("error", type(error).__name__, str(error))
    return (row["input_ids"], row["labels"], row["reason"], row["detail"])


def assert_same_rows(encoder: ChatEncoder, is_vision: bool, records: dict[str, list[dict]], monkeypatch) -> None:
    reference = dataclasses.replace(encoder, reference=True)
    calls = []  # the cheap path's processor renderings: none, unless a shorter rendering fails its checks
    render_ids = ChatEncoder.render_ids

    def counted(self, conversation, *, add_generation_prompt):
        if not self.reference:
            calls.append(len(conversation))
        return render_ids(self, conversation, add_generation_prompt=add_generation_prompt)

    monkeypatch.setattr(ChatEncoder, "render_ids", counted)
    compared = 0
    for name, rows in records.items():
        for index, record in enumerate(rows):
            if record["images"] and not is_vision:
                # A text-only template writes an image part as its Python repr, memory address included: the
                # rendering differs from one load of the image to the next on either path.
                continue
            calls.clear()
            cheap = outcome(encoder, record)
            expected = outcome(reference, record)
            assert cheap == expected, f"{name} record {index}"
            if is_vision and expected[0] != "error" and expected[2] is None:
                assert not calls, f"{name} record {index} went through the processor {len(calls) + 1} times"
            compared += 1
    assert compared >= 150


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_tiny_twins_label_every_set_as_the_reference_path(tiny_models, arch, records, monkeypatch):
    assert_same_rows(chat_encoder(tiny_models[arch]), ARCHITECTURES[arch].is_vision, records, monkeypatch)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_real_vocabularies_label_every_set_as_the_reference_path(arch, records, monkeypatch):
    architecture = ARCHITECTURES[arch]
    encoder = ChatEncoder(real_processor(arch), architecture.end_of_turn_token, DATE)
    assert_same_rows(encoder, architecture.is_vision, records, monkeypatch)


def test_placeholder_runs_copy_the_processors_counts_and_refuse_what_they_cannot_account_for():
    runs = PlaceholderRuns.of([1, 9, 9, 9, 2, 9, 3, 9, 9], token=9, images=3)
    assert runs.lengths == [3, 1, 2]
    assert runs.expand([1, 9, 2, 9, 3]) == [1, 9, 9, 9, 2, 9, 3]  # the first two images of the conversation
    assert runs.expand([1, 2, 3]) == [1, 2, 3]
    assert runs.expand([9, 1, 9, 2, 9, 3, 9]) is None  # more images than the conversation has
    # Mllama: one token per image, so two images side by side are still told apart.
    assert PlaceholderRuns.of([1, 9, 9, 2, 9], token=9, images=3).expand([1, 9, 9, 2]) == [1, 9, 9, 2]
    assert PlaceholderRuns.of([1, 9, 9, 9, 2], token=9, images=2) is None  # a run of three: 1+2 or 2+1?


# Wide, tall, under Qwen's minimum, not multiples of its 28-pixel factor, and one past its 1,003,520-pixel default
# maximum: each a size the smart-resize rule rounds differently.
SIZES = [(56, 56), (57, 200), (300, 29), (30, 30), (640, 481), (1280, 800), (97, 61)]


def sized_records(image_root: Path) -> list[dict]:
    """One record per size, a sample image resized to it; then one with two of them (a list of sizes not seen)."""
    (image_root / "sized").mkdir()
    names = []
    for width, height in SIZES:
        name = f"sized/{width}x{height}.png"
        with Image.open(SHAPES / "images/train_0000.png") as image:
            image.resize((width, height)).save(image_root / name)
        names.append(name)
    question = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape?"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}
    records = [{"messages": [question, answer], "images": [name], "source_line": i} for i, name in enumerate(names)]
    two = {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}
    return [*records, {"messages": [two, answer], "images": names[1:3], "source_line": len(names)}]


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "mllama"])
@pytest.mark.parametrize("vocabulary", ["tiny", "real"])
def test_image_token_counts_are_the_processors_for_every_size_and_images_are_processed_once_per_size(
    tiny_models, arch, vocabulary, tmp_path, monkeypatch
):
    if vocabulary == "tiny":
        encoder = chat_encoder(tiny_models[arch])
    else:
        encoder = ChatEncoder(real_processor(arch), ARCHITECTURES[arch].end_of_turn_token, DATE)
    records = sized_records(tmp_path)
    reference = dataclasses.replace(encoder, reference=True)
    processed = []  # the cheap path's whole-conversation processor calls, by the record's image sizes
    call = type(encoder.processor).__call__

    def counted(self, *args, images=None, **kwargs):
        if self is encoder.processor and images:
            processed.append(tuple(image.size for image in images[0]))
        return call(self, *args, images=images, **kwargs)

    def encode(chosen: ChatEncoder, record: dict) -> tuple:
        row = encode_record(
            chosen, record, tmp_path, max_length=8192, train_on="all_assistant_turns", truncate_text_only=False
        )
        return row["input_ids"], row["labels"], row["reason"]

    expected = [encode(reference, record) for record in records]
    monkeypatch.setattr(type(encoder.processor), "__call__", counted)
    for again in (False, True):
        processed.clear()
        assert [encode(encoder, record) for record in records] == expected, f"second pass: {again}"
        if again:  # every list of sizes is known now: no image is processed
            assert processed == []
        elif arch == "qwen2_5_vl":  # its size rule agreed with the first record, and counts every other size
            assert encoder.image_tokens.sizes_rule is True
            assert processed == [((56, 56),)]
        else:  # Mllama has no size rule: each new list of sizes once
            assert encoder.image_tokens.sizes_rule is None
            assert processed == [(size,) for size in SIZES] + [tuple(SIZES[1:3])]
    image_token = encoder.processor.image_token_id
    counts = [row[0].count(image_token) for row in expected]
    if arch == "mllama":  # one token an image, whatever its size
        assert counts == [1] * len(SIZES) + [2]
    else:  # 30x30 is raised to the 56x56 minimum, so the two count alike; every other size counts its own
        assert counts[0] == counts[3] and len(set(counts)) == len(SIZES), counts
