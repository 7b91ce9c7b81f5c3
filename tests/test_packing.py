"""Padding-free Qwen2.5-VL: records packed into one row train exactly as the same records one at a time.

A packed row is right only if every record sees just its own tokens (the block-diagonal mask transformers builds
from the restarting text positions) at its own M-RoPE positions (each record's ``get_rope_index``), and each
record's images reach its own image tokens. The proof is numerical, in fp32 on CPU: the packed batch's loss and
every parameter's gradient against the token-weighted sum over the records run alone, with no padding, for each
attention implementation the model offers on a CPU (sdpa, eager), on the tiny twin and with the real 152k
vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from real_tokenizers import real_processor
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from vlm_pipeline.architectures import get_architecture, qwen2_5_vl
from vlm_pipeline.data.encoding import IGNORE_INDEX, encode_messages
from vlm_pipeline.data.labels import ChatEncoder
from vlm_pipeline.training.collator import SFTCollator
from vlm_pipeline.training.trainer import turn_off_kv_cache

ARCHITECTURE = get_architecture("qwen2_5_vl")
# The attention implementations Qwen2.5-VL offers that train on a CPU. flash_attention_2 needs CUDA (bench/gpu.py);
# flex_attention the model does not offer (the test below notices when transformers adds it).
ATTENTION = ("sdpa", "eager")
TOLERANCE = 1e-5
# (width, height) of each test image: multiples of 28 (patch 14 × merge 2), so the processor keeps them as they are
# and each gives (height / 28) × (width / 28) image tokens: 4, 8, 15 and 25.
IMAGE_SIZES = {"a.png": (56, 56), "b.png": (112, 56), "c.png": (84, 140), "d.png": (140, 140)}


def user(text: str, *images: str) -> dict:
    return {"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


# One image; images in a later turn (two at once); text only; an image in the first turn and a second exchange.
RECORDS = [
    ([user("What shape is this?", "a.png"), assistant("A red circle.")], ["a.png"]),
    (
        [
            user("Hello."),
            assistant("Hi! Show me."),
            user("Which is bigger?", "b.png", "c.png"),
            assistant("The second one, the tall green rectangle."),
        ],
        ["b.png", "c.png"],
    ),
    ([user("Name three colours."), assistant("Red, green and blue.")], []),
    (
        [user("Describe it.", "d.png"), assistant("A blue square."), user("Any text?"), assistant("None.")],
        ["d.png"],
    ),
]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for name, (width, height) in IMAGE_SIZES.items():
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / name)
    return root


def encoded_rows(processor, image_root: Path) -> list[dict]:
    """The records as preprocessing stores them: input_ids with image tokens expanded, labels, image paths."""
    encoder = ChatEncoder(processor, ARCHITECTURE.end_of_turn_token, {})
    rows = []
    for messages, images in RECORDS:
        loaded = [Image.open(image_root / name).convert("RGB") for name in images]
        rows.append({**encode_messages(encoder, messages, loaded), "image_paths": images})
    return rows


def twin(tiny_models, attention: str):
    model_dir = tiny_models["qwen2_5_vl"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attention
    )
    turn_off_kv_cache(model)  # as the trainer does
    return model, AutoProcessor.from_pretrained(model_dir)


def real_vocabulary_model(attention: str):
    """The tiny layout over the real 152k-vocabulary tokenizer and the real processor settings (random weights)."""
    processor = real_processor("qwen2_5_vl")
    torch.manual_seed(0)
    config = qwen2_5_vl.tiny_config(processor.tokenizer)
    config._attn_implementation = attention
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    turn_off_kv_cache(model)
    return model, processor


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def label_count(labels: torch.Tensor) -> int:
    """Label tokens the loss counts: the model predicts token n+1 from token n, so the first label never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("vocabulary", ["twin", "real"])
def test_packed_positions_are_each_records_own(tiny_models, image_root, vocabulary):
    """Rows 1-3 of the packed position ids are, record by record, what the model's ``get_rope_index`` gives that
    record alone; row 0 restarts at 0 at each record."""
    model, processor = twin(tiny_models, "sdpa") if vocabulary == "twin" else real_vocabulary_model("sdpa")
    rows = encoded_rows(processor, image_root)
    collator = SFTCollator(processor, ARCHITECTURE, image_root, padding_free=True)
    packed = collator(rows)["position_ids"]
    assert packed.shape == (4, 1, sum(len(row["input_ids"]) for row in rows))
    start = 0
    for row in rows:
        alone = SFTCollator(processor, ARCHITECTURE, image_root)([row])
        expected, _ = model.model.get_rope_index(
            alone["input_ids"],
            alone.get("mm_token_type_ids", torch.zeros_like(alone["input_ids"])),
            image_grid_thw=alone.get("image_grid_thw"),
        )
        n = len(row["input_ids"])
        assert packed[0, 0, start : start + n].tolist() == list(range(n))
        assert torch.equal(packed[1:, :, start : start + n], expected), f"record at {start}"
        start += n
    assert any(row["image_paths"] for row in rows[1:]), "a record after the first has images"


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("vocabulary", ["twin", "real"])
def test_a_packed_batch_trains_as_its_records_one_at_a_time(tiny_models, image_root, vocabulary, attention):
    model, processor = twin(tiny_models, attention) if vocabulary == "twin" else real_vocabulary_model(attention)
    model.train()
    rows = encoded_rows(processor, image_root)
    packed = SFTCollator(processor, ARCHITECTURE, image_root, padding_free=True)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed, "one row, no padding"
    assert packed["pixel_values"].shape[0] == sum(
        IMAGE_SIZES[name][0] * IMAGE_SIZES[name][1] // 14**2 for row in rows for name in row["image_paths"]
    )

    model.zero_grad()
    packed_loss = model(**packed).loss
    packed_loss.backward()
    packed_gradients = gradients(model)

    model.zero_grad()
    alone = [SFTCollator(processor, ARCHITECTURE, image_root)([row]) for row in rows]
    tokens = [label_count(batch["labels"]) for batch in alone]
    assert label_count(packed["labels"]) == sum(tokens), "each record's first label is masked, no other"
    summed = torch.zeros(())
    for batch, count in zip(alone, tokens, strict=True):
        loss = model(**batch).loss * count / sum(tokens)  # the record's share of the token mean
        loss.backward()
        summed = summed + loss.detach()

    assert relative_error(packed_loss.detach(), summed) < TOLERANCE, (packed_loss.item(), summed.item())
    single_gradients = gradients(model)
    assert packed_gradients.keys() == single_gradients.keys()
    assert any(name.startswith("model.visual.") for name in packed_gradients), "the images reach the loss"
    errors = {name: relative_error(packed_gradients[name], single_gradients[name]) for name in single_gradients}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, f"{worst}: {errors[worst]:.2e}"


def test_a_packed_row_that_mixes_records_up_is_caught(tiny_models, image_root):
    """The check can fail: the same row without the restarting positions (one long sequence, as a collator that
    forgot the boundaries would give) or with a KV cache on (transformers then ignores the boundaries) changes the
    loss by far more than the tolerance."""
    model, processor = twin(tiny_models, "sdpa")
    rows = encoded_rows(processor, image_root)
    packed = SFTCollator(processor, ARCHITECTURE, image_root, padding_free=True)(rows)
    with torch.no_grad():
        right = model(**packed).loss
        running_on = model(**{**packed, "position_ids": None}).loss
        cached = model(**packed, use_cache=True).loss
    assert relative_error(running_on, right) > 10 * TOLERANCE
    assert relative_error(cached, right) > 10 * TOLERANCE


def test_flex_attention_is_not_offered_for_qwen2_5_vl(tiny_models):
    """transformers refuses flex attention for Qwen2.5-VL (and torch has no flex backward on a CPU): when a release
    offers it, this fails, and flex_attention joins ATTENTION above."""
    with pytest.raises(ValueError, match="does not support an attention implementation through torch's flex"):
        Qwen2_5_VLForConditionalGeneration.from_pretrained(
            tiny_models["qwen2_5_vl"], attn_implementation="flex_attention"
        )
