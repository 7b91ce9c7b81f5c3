"""The tiny architectures: built offline, loaded through the real from_pretrained path, and actually usable."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image, ImageDraw

from vlm_pipeline.architectures import (
    ARCHITECTURES,
    architecture_for_model,
    get_architecture,
    load_model,
    load_processor,
)

NAMES = ("qwen2_5_vl", "mllama", "llama")
ANSWER = "The shape is a red circle."
PROCESSOR_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "mllama": "MllamaProcessor"}


def shape_image(colour: str, shape: str = "circle") -> Image.Image:
    image = Image.new("RGB", (56, 56), "white")
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)((12, 12, 44, 44), fill=colour)
    return image


def conversation(is_vision: bool, image: Image.Image | None = None, answer: str | None = ANSWER) -> list[dict]:
    user = [{"type": "text", "text": "What color is the shape?"}]
    if is_vision:
        user.insert(0, {"type": "image", "image": image or shape_image("red")})
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def encode(processor, messages: list[dict], **kwargs) -> dict:
    return processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt", **kwargs)


def model_inputs(encoded) -> dict:
    return {key: value for key, value in encoded.items() if key != "assistant_masks"}


@pytest.fixture(scope="module", params=NAMES)
def built(request, tmp_path_factory):
    """(architecture, model dir, loaded model, loaded processor), built once per architecture."""
    architecture = get_architecture(request.param)
    model_dir = architecture.build_tiny(tmp_path_factory.mktemp(request.param) / "model", 0)
    return architecture, model_dir, load_model(model_dir).eval(), load_processor(model_dir)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def test_loads_with_the_real_classes(built):
    architecture, model_dir, model, processor = built
    assert type(model) is architecture.model_class
    assert architecture_for_model(model_dir) is architecture
    if architecture.is_vision:
        assert type(processor).__name__ == PROCESSOR_CLASSES[architecture.name]
        assert processor.chat_template == tokenizer_of(processor).chat_template
    assert processor.chat_template and "{% generation" in processor.chat_template.replace("{%-", "{%")
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(path.name.startswith(".") for path in model_dir.parent.iterdir())
    assert not list(model_dir.glob("*.bin"))  # safetensors only


def test_special_tokens_and_generation_config(built):
    architecture, _, model, processor = built
    tokenizer = tokenizer_of(processor)
    end_of_turn = tokenizer.convert_tokens_to_ids(architecture.end_of_turn_token)
    eos = model.generation_config.eos_token_id
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])
    assert tokenizer.pad_token_id is not None and model.generation_config.pad_token_id == tokenizer.pad_token_id
    if architecture.name == "qwen2_5_vl":
        tokens = {
            "image_token_id": "<|image_pad|>",
            "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>",
            "vision_end_token_id": "<|vision_end|>",
        }
        for field, token in tokens.items():
            assert getattr(model.config, field) == tokenizer.convert_tokens_to_ids(token)
        assert tokenizer.pad_token == "<|endoftext|>"
    if architecture.name == "mllama":
        image_id = tokenizer.convert_tokens_to_ids("<|image|>")
        # As in Llama-3.2-Vision: <|image|> is the last token, embeddable but outside the LM head.
        assert model.config.image_token_index == image_id == len(tokenizer) - 1
        assert model.config.text_config.vocab_size == image_id
        assert model.get_input_embeddings().num_embeddings == image_id + 8
        assert model.lm_head.out_features == image_id
        assert model.model.language_model.layers[1].cross_attn_attn_gate.item() != 0.0  # opened by the builder
    if architecture.name in ("mllama", "llama"):
        assert tokenizer.pad_token == "<|finetune_right_pad_id|>"


def test_assistant_mask_is_the_answer_and_end_of_turn(built):
    architecture, _, _, processor = built
    encoded = encode(processor, conversation(architecture.is_vision), return_assistant_tokens_mask=True)
    input_ids = encoded["input_ids"][0]
    mask = torch.as_tensor(encoded["assistant_masks"])[0].bool()
    assert tokenizer_of(processor).decode(input_ids[mask]) == ANSWER + architecture.end_of_turn_token
    # The masked span is contiguous and the answer is its only assistant turn.
    positions = mask.nonzero().flatten()
    assert positions.tolist() == list(range(int(positions[0]), int(positions[-1]) + 1))


def test_chat_format(built):
    architecture, _, _, processor = built
    text = processor.apply_chat_template(conversation(architecture.is_vision), tokenize=False)
    question = conversation(architecture.is_vision, answer=None)
    prompt = processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    if architecture.name == "qwen2_5_vl":
        assert text == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>What color is the shape?<|im_end|>\n"
            f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n"
        )
        assert prompt.endswith("<|im_start|>assistant\n")
    else:
        image = "<|image|>" if architecture.is_vision else ""
        assert text == (
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            f"{image}What color is the shape?<|eot_id|>"
            f"<|start_header_id|>assistant<|end_header_id|>\n\n{ANSWER}<|eot_id|>"
        )
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        ids = encode(processor, conversation(architecture.is_vision))["input_ids"][0].tolist()
        assert ids.count(tokenizer_of(processor).bos_token_id) == 1  # the template's BOS is not doubled


def test_forward_loss_backward_and_generate(built):
    architecture, _, model, processor = built
    encoded = encode(processor, conversation(architecture.is_vision), return_assistant_tokens_mask=True)
    labels = encoded["input_ids"].masked_fill(~torch.as_tensor(encoded["assistant_masks"]).bool(), -100)
    output = model(**model_inputs(encoded), labels=labels)
    assert math.isfinite(output.loss.item())
    output.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.ndim > 1)
    model.zero_grad(set_to_none=True)

    prompt = encode(processor, conversation(architecture.is_vision, answer=None), add_generation_prompt=True)
    with torch.no_grad():
        generated = model.generate(**model_inputs(prompt), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 3


def test_the_image_changes_the_logits(built):
    """Fails for an Mllama saved with its tanh gates at their zero init: the image would reach nothing."""
    architecture, _, model, processor = built
    if not architecture.is_vision:
        pytest.skip("text-only architecture")
    with torch.no_grad():
        logits = [
            model(**model_inputs(encode(processor, conversation(True, image)))).logits
            for image in (shape_image("red"), shape_image("blue", "square"))
        ]
    assert logits[0].shape == logits[1].shape
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_image_inputs_match_the_processor(built):
    """``Architecture.image_inputs`` (used by the collator on pre-tokenised rows) equals the processor's output."""
    architecture, _, _, processor = built
    if not architecture.is_vision:
        assert architecture.image_inputs is None
        return
    images = [shape_image("red"), shape_image("green", "square")]
    conversations = [conversation(True, image) for image in images]
    encoded = encode(processor, conversations, processor_kwargs={"padding": True})
    ours = architecture.image_inputs(processor, [[image] for image in images], encoded["input_ids"])
    for key, value in ours.items():
        assert torch.equal(value, torch.as_tensor(encoded[key]).to(value.dtype)), key


def test_build_is_deterministic_and_replaces_atomically(tmp_path):
    for name in NAMES:
        build = get_architecture(name).build_tiny
        first, second = build(tmp_path / f"{name}-a", 0), build(tmp_path / f"{name}-b", 0)
        for file in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (first / file).read_bytes() == (second / file).read_bytes(), (name, file)
        (first / "stale.txt").write_text("from the previous build")
        rebuilt = build(first, 1)
        assert not (rebuilt / "stale.txt").exists()
        assert (rebuilt / "model.safetensors").read_bytes() != (second / "model.safetensors").read_bytes()
        assert (rebuilt / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


def test_tokenizer_round_trips_any_text(built):
    _, _, _, processor = built
    tokenizer = tokenizer_of(processor)
    text = "건설 현장의 안전 규칙: 3 blue triangles ★"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert 1000 <= len(tokenizer) <= 2000


def test_registry_errors_name_the_choices(tmp_path):
    assert set(ARCHITECTURES) == set(NAMES)
    with pytest.raises(ValueError, match="qwen2_5_vl.*mllama.*llama"):
        get_architecture("gpt2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json.*'gpt2'"):
        architecture_for_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        architecture_for_model(tmp_path / "missing")

