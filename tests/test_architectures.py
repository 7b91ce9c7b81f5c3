"""The tiny architectures: built offline, loaded through the real from_pretrained path, and actually usable."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pkgutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor

import vlm_pipeline.architectures as architectures_package
from vlm_pipeline.architectures import (
    ARCHITECTURES,
    Architecture,
    architecture_for_model,
    get_architecture,
    load_model,
    load_processor,
)
from vlm_pipeline.config.schema import ImageBounds
from vlm_pipeline.data.labels import ChatEncoder, chat_messages

NAMES = tuple(ARCHITECTURES)
VISION_NAMES = tuple(name for name, architecture in ARCHITECTURES.items() if architecture.is_vision)
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


DATE = {"date_string": "26 Jul 2024"}


def encode(processor, messages: list[dict], **kwargs) -> dict:
    """As every stage renders: text-only content as strings (the Llama templates trim it), the date pinned."""
    if isinstance(messages[0], list):
        messages = [chat_messages(conversation) for conversation in messages]
    else:
        messages = chat_messages(messages)
    return processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", **{**DATE, **kwargs}
    )


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
        # The real processor settings, verbatim (a twin in everything but size).
        saved = json.loads((model_dir / "processor_config.json").read_text())["image_processor"]
        real = architecture.real_checkpoint.image_processor_settings()
        if architecture.name == "qwen2_5_vl":  # transformers 5 stores min/max pixels as size edges
            real["size"] = {"shortest_edge": real.pop("min_pixels"), "longest_edge": real.pop("max_pixels")}
        if architecture.name == "mllama":  # the tile's pixels are a size: the one setting the twin shrinks
            assert real.pop("size") == {"height": 560, "width": 560} and saved["size"] == {"height": 56, "width": 56}
        assert {key: saved[key] for key in real} == real
    if architecture.name == "qwen2_5_vl":  # the vision tower's settings that are not sizes: patches, windows, time
        real_vision = architecture.real_checkpoint.json("config.json")["vision_config"]
        kept = ("patch_size", "spatial_merge_size", "temporal_patch_size", "window_size", "tokens_per_second")
        twin_vision = model.config.vision_config
        assert {key: getattr(twin_vision, key) for key in kept} == {key: real_vision[key] for key in kept}
    # The real checkpoint's chat template, byte for byte.
    assert processor.chat_template == architecture.real_checkpoint.chat_template()
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
    # Stop tokens: the real generation_config.json's (Llama 3.1) or the real special-token table's, by name.
    stops = [tokenizer.convert_tokens_to_ids(t) for t in architecture.real_checkpoint.special_tokens["stop_tokens"]]
    assert eos == stops
    assert tokenizer.pad_token_id is not None  # load_processor always leaves one
    assert model.generation_config.pad_token_id in (None, tokenizer.pad_token_id)
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
        assert tokenizer.pad_token_id < len(tokenizer)  # a token of its own vocabulary: no resize


def test_llama_31_twin_sets_no_pad_token_and_the_loader_picks_the_reserved_one(built, caplog):
    """As Llama-3.1-8B-Instruct ships: no pad token in the saved tokenizer; loading picks the fine-tune pad."""
    architecture, model_dir, model, _ = built
    if architecture.name != "llama":
        pytest.skip("the Llama 3.1 twin only")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    with caplog.at_level("INFO", logger="vlm_pipeline.architectures"):
        tokenizer = load_processor(model_dir)
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert "sets no pad token; padding with <|finetune_right_pad_id|>" in caplog.text
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)  # never resized


def test_assistant_span_is_the_answer_and_end_of_turn(built):
    architecture, _, _, processor = built
    encoder = ChatEncoder(processor, architecture.end_of_turn_token, DATE)
    input_ids, spans = encoder.assistant_spans(conversation(architecture.is_vision))
    assert input_ids == encode(processor, conversation(architecture.is_vision))["input_ids"][0].tolist()
    assert [tokenizer_of(processor).decode(input_ids[a:b]) for a, b in spans] == [
        ANSWER + architecture.end_of_turn_token
    ]


def test_chat_format(built):
    architecture, _, _, processor = built
    text = processor.apply_chat_template(chat_messages(conversation(architecture.is_vision)), tokenize=False, **DATE)
    question = chat_messages(conversation(architecture.is_vision, answer=None))
    prompt = processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True, **DATE)
    if architecture.name == "qwen2_5_vl":
        assert text == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>What color is the shape?<|im_end|>\n"
            f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n"
        )
        assert prompt.endswith("<|im_start|>assistant\n")
    else:
        # Llama 3.1 always writes a system header with the dates; 3.2-Vision drops it when images come without
        # a system message.
        system = (
            ""
            if architecture.is_vision
            else "<|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        )
        image = "<|image|>" if architecture.is_vision else ""
        assert text == (
            f"<|begin_of_text|>{system}<|start_header_id|>user<|end_header_id|>\n\n"
            f"{image}What color is the shape?<|eot_id|>"
            f"<|start_header_id|>assistant<|end_header_id|>\n\n{ANSWER}<|eot_id|>"
        )
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        ids = encode(processor, conversation(architecture.is_vision))["input_ids"][0].tolist()
        assert ids.count(tokenizer_of(processor).bos_token_id) == 1  # the template's BOS is not doubled


def test_forward_loss_backward_and_generate(built):
    architecture, _, model, processor = built
    encoded = encode(processor, conversation(architecture.is_vision))
    _, [(start, end)] = ChatEncoder(processor, architecture.end_of_turn_token, DATE).assistant_spans(
        conversation(architecture.is_vision)
    )
    labels = torch.full_like(encoded["input_ids"], -100)
    labels[:, start:end] = encoded["input_ids"][:, start:end]
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
    with pytest.raises(ValueError, match=".*".join(ARCHITECTURES)):
        get_architecture("gpt2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json.*'gpt2'"):
        architecture_for_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        architecture_for_model(tmp_path / "missing")


def test_every_family_module_is_registered_once():
    """A family is one module defining ``ARCHITECTURE`` plus its line in the registry: forgetting the line fails."""
    defined = {}
    for module_info in pkgutil.iter_modules(architectures_package.__path__):
        module = importlib.import_module(f"{architectures_package.__name__}.{module_info.name}")
        if isinstance(getattr(module, "ARCHITECTURE", None), Architecture):
            defined[module_info.name] = module.ARCHITECTURE
    assert defined, "no family module found"
    assert sorted(a.name for a in defined.values()) == sorted(ARCHITECTURES)
    assert all(ARCHITECTURES[a.name] is a for a in defined.values())
    model_types = [a.model_type for a in ARCHITECTURES.values()]
    assert len(set(model_types)) == len(model_types), "architecture_for_model could not tell two families apart"


def test_image_bound_fields_are_exactly_the_schema_fields_and_named_in_their_help():
    """``preprocessing.images`` (``ImageBounds``, which may not import the registry) offers exactly the fields some
    family honours, and each field's help text names, as ``(registry name)``, every family that reads it."""
    declared = {field: set() for field in ImageBounds.model_fields}
    for architecture in ARCHITECTURES.values():
        for field in architecture.image_bound_fields:
            assert field in declared, f"{architecture.name} reads {field!r}, which ImageBounds does not offer"
            declared[field].add(architecture.name)
    for field, readers in declared.items():
        assert readers, f"ImageBounds.{field} is read by no registered family"
        description = ImageBounds.model_fields[field].description or ""
        named = {name for name in ARCHITECTURES if f"({name})" in description}
        assert named == readers, f"ImageBounds.{field}: help names {sorted(named)}, read by {sorted(readers)}"


class RecordingBounds(dict):
    """Bounds that set nothing (every field None) and remember which fields were asked for."""

    def __init__(self):
        super().__init__()
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return default

    def __getitem__(self, key):
        self.read.add(key)
        return None


def real_image_processor(architecture: Architecture):
    """The real checkpoint's image processor (published preprocessor_config.json), inside a processor-like shell."""
    return SimpleNamespace(image_processor=AutoImageProcessor.from_pretrained(architecture.real_checkpoint.path))


@pytest.mark.parametrize("name", NAMES)
def test_image_bound_fields_are_the_fields_the_family_reads(name):
    architecture = get_architecture(name)
    bounds = RecordingBounds()
    assert (architecture.vision_tokens_per_image(bounds) > 0) == architecture.is_vision
    if architecture.bound_images is not None:
        architecture.bound_images(real_image_processor(architecture), bounds)
    assert bounds.read == set(architecture.image_bound_fields)


@pytest.mark.parametrize("name", VISION_NAMES)
def test_vision_mlp_gated_matches_the_model(name):
    """The planner's vision-activation estimate counts a SwiGLU MLP (``gate_proj``) only where the tower has one."""
    from transformers import AutoConfig

    from vlm_pipeline.training.trainable import component_of

    architecture = get_architecture(name)
    config = AutoConfig.from_pretrained(architecture.real_checkpoint.path)
    with torch.device("meta"):
        model = architecture.model_class._from_config(config)
    tower = [module for module, _ in model.named_modules() if component_of(module, architecture) == "vision_tower"]
    assert tower, f"no vision_tower modules in {name}"
    assert any(module.endswith(".gate_proj") for module in tower) == architecture.vision_mlp_gated


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("qwen2_5_vl", {"vision_mlp_gated": None}, "must set vision_mlp_gated"),
        ("qwen2_5_vl", {"image_inputs": None}, "must set image_inputs"),
        ("qwen2_5_vl", {"image_bound_fields": ()}, "bound_images and image_bound_fields go together"),
        ("qwen2_5_vl", {"vision_tokens_per_image": lambda bounds: 0}, "positive count"),
        ("llama", {"image_bound_fields": ("max_pixels",)}, "text-only .* sets image_bound_fields"),
        ("llama", {"vision_tokens_per_image": lambda bounds: 5}, "text-only family's is 0"),
    ],
)
def test_a_record_mixing_vision_and_text_only_facts_is_refused(name, change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_architecture(name), **change)
