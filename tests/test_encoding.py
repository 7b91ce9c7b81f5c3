"""Preprocessing exactness on real records for every architecture: labels are the assistant turns, exactly;
over-long records are set aside or (text only) cut, never truncated through image tokens."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROJECT_ROOT, chat_encoder, run_context

from vlm_pipeline.architectures import get_architecture, load_processor
from vlm_pipeline.config.schema import ConfigError, PreprocessingParams
from vlm_pipeline.data.encoding import IGNORE_INDEX, TOO_LONG, encode_messages, encode_record, load_images
from vlm_pipeline.data.formats import normalise_record

SHAPES = PROJECT_ROOT / "data/01_raw/shapes_vqa"
ANSWERS = ["It is a red circle.", "No, there is only one shape."]


def multi_turn(is_vision: bool) -> dict:
    """System prompt, two user turns (the first with an image for VLMs) and two assistant turns."""
    first = [{"type": "image"}, {"type": "text", "text": "Describe the shape."}] if is_vision else "Describe a shape."
    record = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": first},
            {"role": "assistant", "content": ANSWERS[0]},
            {"role": "user", "content": "Are there two shapes?"},
            {"role": "assistant", "content": ANSWERS[1]},
        ],
        "images": ["images/train_0000.png"] if is_vision else [],
    }
    return {**normalise_record(record), "source_line": 1}


def label_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for token in labels:
        if token == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(token)
    return spans + ([current] if current else [])


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "mllama", "llama"])
@pytest.mark.parametrize("train_on", ["all_assistant_turns", "last_assistant_turn"])
def test_labels_are_exactly_the_assistant_turns(tiny_models, arch, train_on):
    architecture = get_architecture(arch)
    encoder = chat_encoder(tiny_models[arch])
    tokenizer = encoder.tokenizer
    record = multi_turn(architecture.is_vision)
    encoded = encode_messages(encoder, record["messages"], load_images(record, SHAPES), train_on=train_on)

    spans = [tokenizer.decode(span) for span in label_spans(encoded["labels"])]
    expected = ANSWERS if train_on == "all_assistant_turns" else ANSWERS[-1:]
    assert spans == [answer + architecture.end_of_turn_token for answer in expected]
    # Where a label is kept it equals the input token (no shift here; the model shifts).
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True))
    specials = {tokenizer.pad_token_id}
    if architecture.image_token:
        image_id = tokenizer.convert_tokens_to_ids(architecture.image_token)
        assert image_id in encoded["input_ids"], "the processor expanded the image placeholder"
        specials.add(image_id)
    assert not specials & {t for t in encoded["labels"] if t != IGNORE_INDEX}
    system_and_prompts = tokenizer.decode(
        [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label == IGNORE_INDEX]
    )
    assert "Answer briefly." in system_and_prompts and "Are there two shapes?" in system_and_prompts


def test_records_with_images_are_never_cut(tiny_models):
    encoder = chat_encoder(tiny_models["qwen2_5_vl"])
    record = multi_turn(is_vision=True)
    row = encode_record(encoder, record, SHAPES, max_length=20, train_on="all_assistant_turns", truncate_text_only=True)
    assert row["reason"] == TOO_LONG and "images" in row["detail"] and row["cut"] == 0
    assert row["length"] > 20


def test_text_records_are_cut_only_when_allowed_and_only_if_a_label_survives(tiny_models):
    encoder = chat_encoder(tiny_models["llama"])
    record = multi_turn(is_vision=False)
    full = encode_record(
        encoder, record, SHAPES, max_length=10_000, train_on="all_assistant_turns", truncate_text_only=False
    )
    first_label = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    limit = first_label + 3

    kept = encode_record(
        encoder, record, SHAPES, max_length=limit, train_on="all_assistant_turns", truncate_text_only=False
    )
    assert kept["reason"] == TOO_LONG and "truncate_text_only is off" in kept["detail"]

    cut = encode_record(
        encoder, record, SHAPES, max_length=limit, train_on="all_assistant_turns", truncate_text_only=True
    )
    assert cut["reason"] is None and len(cut["input_ids"]) == limit == cut["length"]
    assert cut["cut"] == full["length"] - limit
    assert cut["input_ids"] == full["input_ids"][:limit]

    nothing_left = encode_record(
        encoder, record, SHAPES, max_length=first_label, train_on="all_assistant_turns", truncate_text_only=True
    )
    assert nothing_left["reason"] == TOO_LONG and "no assistant token" in nothing_left["detail"]


def test_image_bounds_change_what_the_processor_produces(tiny_models):
    record = multi_turn(is_vision=True)
    images = load_images(record, SHAPES)  # 56×56

    def image_tokens(bounds):
        encoder = chat_encoder(tiny_models["qwen2_5_vl"], images=bounds or {})
        ids = encode_messages(encoder, record["messages"], images)["input_ids"]
        return ids.count(encoder.tokenizer.convert_tokens_to_ids("<|image_pad|>"))

    assert image_tokens(None) == 4  # 56×56 → 4×4 patches → 2×2 merged tokens
    assert image_tokens({"min_pixels": 112 * 112, "max_pixels": 112 * 112}) == 16  # resized to 112×112

    mllama = get_architecture("mllama")
    wide = [[load_images(record, SHAPES)[0].resize((112, 56))]]
    processor = load_processor(tiny_models["mllama"], image_bounds={"max_image_tiles": 4})
    inputs = mllama.image_inputs(processor, wide, torch.tensor([[1, 2, 3]]))
    assert inputs["pixel_values"].shape[2] == 4  # padded to the model's tile count: the tower encodes all four


@pytest.mark.parametrize("tiles", [1, 2, 3])
def test_a_tile_count_the_model_cannot_run_stops_at_the_processor(tiny_models, tiles):
    """Mllama's tile embeddings are sized for the checkpoint's 4 tiles: another count failed the first forward."""
    with pytest.raises(ValueError, match=f"preprocessing.images.max_image_tiles: {tiles}, but this checkpoint"):
        load_processor(tiny_models["mllama"], image_bounds={"max_image_tiles": tiles})


def test_parallel_preprocessing_gives_the_same_rows(tiny_models):
    from vlm_pipeline.data.validation import validate_lines
    from vlm_pipeline.pipelines.preprocessing.nodes import tokenize_split

    records = validate_lines(
        (SHAPES / "train.jsonl").read_bytes().splitlines()[:32], SHAPES, max_image_pixels=10**8
    ).valid
    context = run_context(tiny_models["qwen2_5_vl"], SHAPES)
    serial, _, _ = tokenize_split(records, context, PreprocessingParams(max_length=512, num_proc=1))
    parallel, _, _ = tokenize_split(records, context, PreprocessingParams(max_length=512, num_proc=2))
    assert serial.to_list() == parallel.to_list() and len(serial) == 32


def test_padding_free_batches_give_the_padded_loss_without_pad_tokens(tiny_models):
    from vlm_pipeline.architectures import load_model
    from vlm_pipeline.training.collator import SFTCollator

    processor = load_processor(tiny_models["llama"])
    llama = get_architecture("llama")
    glossary = PROJECT_ROOT / "data/01_raw/alpaca_glossary"
    lines = (glossary / "train.jsonl").read_bytes().splitlines()[:6]
    records = [normalise_record(json.loads(line)) for line in lines]
    rows = [encode_messages(chat_encoder(tiny_models["llama"]), r["messages"], []) for r in records]
    assert len({len(row["input_ids"]) for row in rows}) > 1, "rows of different lengths, so padding matters"

    padded = SFTCollator(processor, llama, glossary)(rows)
    flat = SFTCollator(processor, llama, glossary, padding_free=True)(rows)
    assert flat["input_ids"].shape == (1, sum(len(row["input_ids"]) for row in rows))
    assert tokenizer_pad_count(flat["input_ids"], processor.pad_token_id) == 0
    model = load_model(tiny_models["llama"]).eval()
    model.config.use_cache = False  # as the trainer sets it
    with torch.no_grad():
        assert torch.allclose(model(**padded).loss, model(**flat).loss, atol=1e-5)
        # Each row's logits in the flat batch are its logits alone: no attention across rows.
        second = slice(len(rows[0]["input_ids"]), len(rows[0]["input_ids"]) + len(rows[1]["input_ids"]))
        alone = model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits[0]
        assert torch.allclose(model(**flat).logits[0, second], alone, atol=1e-5)

    with pytest.raises(ConfigError, match="mllama records cannot be packed.*sft.max_tokens_per_batch"):
        SFTCollator(load_processor(tiny_models["mllama"]), get_architecture("mllama"), SHAPES, padding_free=True)


def tokenizer_pad_count(input_ids: torch.Tensor, pad_id: int) -> int:
    return int((input_ids == pad_id).sum())
