"""Labels from the checkpoints' own chat templates, unchanged: the decoded labels are exactly the assistant texts
plus end-of-turn, on the tiny twins (real templates, real processors, tokenizers trained here) and on the real
128k/152k vocabularies (rebuilt offline, tests/real_tokenizers.py)."""

from __future__ import annotations

import json

import pytest
from conftest import PROJECT_ROOT, chat_encoder, run_context
from PIL import Image
from real_tokenizers import real_processor

from vlm_pipeline.architectures import get_architecture, mllama
from vlm_pipeline.config.schema import ConfigError, PreprocessingParams, SFTParams
from vlm_pipeline.data.encoding import (
    IGNORE_INDEX,
    NO_LABEL_TOKENS,
    TEMPLATE_REFUSED,
    TOKEN_MERGE,
    encode_messages,
    encode_record,
)
from vlm_pipeline.data.formats import normalise_record
from vlm_pipeline.data.labels import ChatEncoder, ChatTemplateError

SHAPES = PROJECT_ROOT / "data/01_raw/shapes_vqa"
DATE = {"date_string": "26 Jul 2024"}
ANSWERS = ["It is a red circle.", "Two: a circle and, on the right, a square!", "Yes.\n\nBoth are small."]
TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")


def image_part() -> dict:
    return {"type": "image"}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def conversation(*, system: bool, images: list[int]) -> dict:
    """Three user/assistant exchanges; ``images[i]`` image parts in user turn ``i`` (Qwen: several, anywhere)."""
    messages = [{"role": "system", "content": "Answer briefly, in English."}] if system else []
    questions = ["Describe the picture.", "How many shapes are there?", "Are they small?"]
    for turn, (question, answer) in enumerate(zip(questions, ANSWERS, strict=True)):
        count = images[turn] if turn < len(images) else 0
        messages.append({"role": "user", "content": [image_part()] * count + [text(question)]})
        messages.append({"role": "assistant", "content": answer})
    paths = [f"images/train_{i:04d}.png" for i in range(sum(images))]
    return {**normalise_record({"messages": messages, "images": paths}), "source_line": 7}


def decoded_label_spans(encoder: ChatEncoder, encoded: dict) -> list[str]:
    spans, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    spans += [current] if current else []
    return [encoder.tokenizer.decode(span) for span in spans]


def load(record: dict) -> list[Image.Image]:
    return [Image.open(SHAPES / path).convert("RGB") for path in record["images"]]


def encode_untruncated(encoder: ChatEncoder, record: dict) -> dict:
    """``encode_record`` as preprocessing calls it, with a length limit no test record reaches."""
    return encode_record(
        encoder, record, SHAPES, max_length=4096, train_on="all_assistant_turns", truncate_text_only=False
    )


def expected(end_of_turn: str, train_on: str) -> list[str]:
    answers = ANSWERS if train_on == "all_assistant_turns" else ANSWERS[-1:]
    return [answer + end_of_turn for answer in answers]


CASES = [
    ("qwen2_5_vl", {"system": True, "images": [2, 1]}),
    ("qwen2_5_vl", {"system": False, "images": [1, 0, 2]}),
    ("mllama", {"system": True, "images": [1]}),
    ("mllama", {"system": False, "images": [1]}),
    ("llama", {"system": True, "images": []}),
    ("llama", {"system": False, "images": []}),
]


@pytest.mark.parametrize("train_on", TRAIN_ON)
@pytest.mark.parametrize(
    ("arch", "shape"), CASES, ids=[f"{a}-{'system' if s['system'] else 'no_system'}" for a, s in CASES]
)
def test_twins_train_exactly_the_assistant_turns(tiny_models, arch, shape, train_on):
    encoder = chat_encoder(tiny_models[arch])
    record = conversation(**shape)
    encoded = encode_messages(encoder, record["messages"], load(record), train_on=train_on)
    end_of_turn = get_architecture(arch).end_of_turn_token
    assert decoded_label_spans(encoder, encoded) == expected(end_of_turn, train_on)
    bos = encoder.tokenizer.bos_token_id
    if bos is not None:  # Llama 3: the template writes BOS; it is not added a second time
        assert encoded["input_ids"][0] == bos and encoded["input_ids"].count(bos) == 1


@pytest.mark.parametrize("train_on", TRAIN_ON)
@pytest.mark.parametrize(
    ("arch", "shape"), CASES, ids=[f"{a}-{'system' if s['system'] else 'no_system'}" for a, s in CASES]
)
def test_real_vocabularies_train_exactly_the_assistant_turns(arch, shape, train_on):
    architecture = get_architecture(arch)
    encoder = ChatEncoder(real_processor(arch), architecture.end_of_turn_token, DATE)
    record = conversation(**shape)
    encoded = encode_messages(encoder, record["messages"], load(record), train_on=train_on)
    assert decoded_label_spans(encoder, encoded) == expected(architecture.end_of_turn_token, train_on)
    if arch != "qwen2_5_vl":
        assert encoded["input_ids"][:2] == [128000, 128006]  # one BOS, then the first header


def test_an_answer_merging_into_the_template_text_is_set_aside_not_mislabelled():
    """Qwen writes 'assistant\\n'; an answer starting with a newline merges with it into one '\\n\\n' token
    in the real vocabulary, so its first label would start inside a token."""
    encoder = ChatEncoder(real_processor("qwen2_5_vl"), "<|im_end|>", {})
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello"}]
    row = encode_untruncated(encoder, {**normalise_record({"messages": messages}), "source_line": 3})
    assert row["reason"] == TOKEN_MERGE and "inside a token" in row["detail"]


def test_the_older_llama_vision_template_refuses_system_with_images_per_record(tmp_path):
    """Checkpoints downloaded before December 2024 carry the template that raises on a system message with
    images: such a record is set aside with the template's own message; the rest train."""
    model_dir = mllama.build_tiny(tmp_path / "sept2024", 0, template="sept2024")
    encoder = chat_encoder(model_dir)
    refused = encode_untruncated(encoder, conversation(system=True, images=[1]))
    assert refused["reason"] == TEMPLATE_REFUSED and "incompatible with system messages" in refused["detail"]
    kept = encode_untruncated(encoder, conversation(system=False, images=[1]))
    assert kept["reason"] is None
    assert decoded_label_spans(encoder, kept) == expected("<|eot_id|>", "all_assistant_turns")


HEADER = "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
GENERATION_MARKED = """\
{%- for message in messages -%}
{%- if message['role'] == 'assistant' -%}
{{- HEADER -}}{%- generation -%}{{- message['content'] + '<|eot_id|>' -}}{%- endgeneration -%}
{%- else -%}{{- HEADER + message['content'] + '<|eot_id|>' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}
""".replace("HEADER", HEADER)
# The markers also cover the assistant header, which the turn's rendering does not add.
MARKS_THE_HEADER = GENERATION_MARKED.replace(
    "{{- HEADER -}}{%- generation -%}".replace("HEADER", HEADER),
    "{%- generation -%}{{- HEADER -}}".replace("HEADER", HEADER),
)


def test_generation_markers_must_agree_with_the_rendered_turns(tiny_models, tmp_path):
    record = conversation(system=True, images=[])
    agreeing = tmp_path / "marked.jinja"
    agreeing.write_text(GENERATION_MARKED)
    encoder = chat_encoder(tiny_models["llama"], chat_template=str(agreeing))
    encoded = encode_messages(encoder, record["messages"], [])
    assert decoded_label_spans(encoder, encoded) == expected("<|eot_id|>", "all_assistant_turns")

    # Markers that disagree with what the turn adds: stop, do not guess.
    wrong = tmp_path / "wrong.jinja"
    wrong.write_text(MARKS_THE_HEADER)
    assert MARKS_THE_HEADER != GENERATION_MARKED
    with pytest.raises(ChatTemplateError, match="generation"):
        encode_messages(chat_encoder(tiny_models["llama"], chat_template=str(wrong)), record["messages"], [])


# Writes the number of messages into the system header: adding a turn rewrites the first one.
REWRITING = GENERATION_MARKED.replace(
    "{%- for message", "{{- 'turns: ' + (messages|length)|string -}}{%- for message", 1
)


def test_a_template_that_rewrites_earlier_turns_stops_preprocessing_naming_model_and_record(tiny_models, tmp_path):
    from vlm_pipeline.pipelines.preprocessing.nodes import tokenize_split

    template = tmp_path / "rewriting.jinja"
    template.write_text(REWRITING.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", ""))
    params = PreprocessingParams(chat_template=str(template), template_kwargs={})
    records = [conversation(system=False, images=[])]
    with pytest.raises(ChatTemplateError) as error:
        tokenize_split(records, run_context(tiny_models["llama"], SHAPES), params)
    message = str(error.value)
    assert str(tiny_models["llama"]) in message and "line 7" in message and "not prefix-preserving" in message
    assert "preprocessing.chat_template" in message


def test_image_records_for_a_text_only_model_stop_preprocessing_naming_model_and_record(tiny_models):
    """Llama 3.1's template writes an image part it cannot show as the part's Python repr (a memory address in
    it): trained, that is text that differs run to run. The stage stops on the first such record instead."""
    from vlm_pipeline.pipelines.preprocessing.nodes import tokenize_split

    records = [conversation(system=False, images=[]), {**conversation(system=False, images=[1]), "source_line": 9}]
    with pytest.raises(ConfigError) as error:
        tokenize_split(records, run_context(tiny_models["llama"], SHAPES), PreprocessingParams())
    message = str(error.value)
    assert message.startswith(f"{tiny_models['llama']}: valid.jsonl record from line 9 has 1 image(s)"), message
    assert "reads text only" in message
    kept, _, _ = tokenize_split(records, run_context(tiny_models["qwen2_5_vl"], SHAPES), PreprocessingParams())
    assert list(kept["source_line"]) == [7, 9]  # a vision model takes both


# Renders user turns only: the assistant's turns add nothing, so nothing can be learnt.
SILENT_ASSISTANT = GENERATION_MARKED.replace(
    "{%- generation -%}{{- message['content'] + '<|eot_id|>' -}}{%- endgeneration -%}", ""
)


def test_records_without_label_tokens_are_set_aside_and_a_set_of_them_stops(tiny_models, tmp_path):
    from vlm_pipeline.pipelines.preprocessing.nodes import combine_reports, tokenize_split

    template = tmp_path / "silent.jinja"
    template.write_text(SILENT_ASSISTANT)
    params = PreprocessingParams(chat_template=str(template), template_kwargs={})
    records = [conversation(system=False, images=[]), {**conversation(system=True, images=[]), "source_line": 9}]
    context = run_context(tiny_models["llama"], SHAPES)
    kept, set_aside, report = tokenize_split(records, context, params)
    set_aside = list(set_aside)
    assert len(kept) == 0 and [(row["line"], row["reason"]) for row in set_aside] == [
        (7, NO_LABEL_TOKENS),
        (9, NO_LABEL_TOKENS),
    ]
    assert json.loads(set_aside[0]["raw"])["messages"][1]["role"] == "assistant"  # the record itself is kept
    with pytest.raises(ValueError, match="all 2 records have no label token"):
        combine_reports(report, kept, kept, report, context, SFTParams(per_device_train_batch_size=2))


def test_preprocessing_gives_byte_identical_arrow_files_a_year_later(tiny_models, tmp_path, monkeypatch):
    """Llama 3.2-Vision's template writes today's date (strftime_now) unless date_string is given: the pinned
    preprocessing.template_kwargs default makes the tokens independent of the day."""
    import datetime

    from transformers.utils import chat_template_utils

    from vlm_pipeline.config.schema import PreprocessingParams
    from vlm_pipeline.data.validation import validate_lines
    from vlm_pipeline.pipelines.preprocessing.nodes import tokenize_split

    glossary = PROJECT_ROOT / "data/01_raw/alpaca_glossary"
    records = validate_lines(
        (glossary / "train.jsonl").read_bytes().splitlines()[:8], glossary, max_image_pixels=10**8
    ).valid

    def arrow_files(today: datetime.datetime, template_kwargs: dict) -> dict[str, bytes]:
        class Clock(datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return today

        monkeypatch.setattr(chat_template_utils, "datetime", Clock)  # the clock strftime_now reads
        data, _, _ = tokenize_split(
            records, run_context(tiny_models["mllama"], glossary), PreprocessingParams(template_kwargs=template_kwargs)
        )
        out = tmp_path / f"{today:%Y}-{len(template_kwargs)}"
        data.save_to_disk(out)
        return {path.name: path.read_bytes() for path in sorted(out.glob("*.arrow"))}

    now, next_year = datetime.datetime(2026, 11, 29), datetime.datetime(2027, 11, 29)
    pinned = PreprocessingParams().template_kwargs
    assert pinned == {"date_string": "26 Jul 2024"}
    assert arrow_files(now, pinned) == arrow_files(next_year, pinned)
    # Unpinned, the moved clock reaches the tokens: the comparison above can fail.
    assert arrow_files(now, {}) != arrow_files(next_year, {})


def test_inspect_labels_marks_what_trains(tiny_models, capsys):
    from vlm_pipeline.commands import main

    data = PROJECT_ROOT / "data/01_raw/alpaca_glossary/train.jsonl"
    with pytest.raises(SystemExit) as exit_code:
        main(["inspect-labels", "--model", str(tiny_models["llama"]), str(data), "-n", "2"])
    assert exit_code.value.code == 0
    out = capsys.readouterr().out
    first = json.loads(data.read_text().splitlines()[0])
    assert f"{data}:1: " in out and f"{data}:2: " in out and f"{data}:3: " not in out
    assert f"[[{first['output']}<|eot_id|>]]" in out  # not a terminal: brackets, not colour
    assert out.count("[[") == 2 and "Today Date: 26 Jul 2024" in out


@pytest.mark.parametrize("stop", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
def test_generation_stops_on_every_end_token_of_the_checkpoints_generation_config(tiny_models, stop):
    """Llama-3.1-8B-Instruct's generation_config.json lists three end tokens; a model whose first answer token is
    any of them answers nothing, through the evaluation stage's own generation."""
    import torch

    from vlm_pipeline.architectures import load_model
    from vlm_pipeline.scoring import generate_answers

    encoder = chat_encoder(tiny_models["llama"])
    model = load_model(tiny_models["llama"]).eval()
    stop_id = encoder.tokenizer.convert_tokens_to_ids(stop)
    assert stop_id in model.generation_config.eos_token_id
    prompt = encoder.tokenizer.convert_tokens_to_ids("ĊĊ")  # "\n\n", the generation prompt's last token
    with torch.no_grad():  # layers add nothing, so the last hidden state is the prompt token's normed embedding
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden = model.model.norm(model.model.embed_tokens.weight[prompt])
        model.lm_head.weight.zero_()
        model.lm_head.weight[stop_id] = 100 * hidden  # the stop token wins the first step by far

    record = {
        "messages": [
            {"role": "user", "content": [text("Define beam.")]},
            {"role": "assistant", "content": [text("x")]},
        ],
        "images": [],
    }
    inputs = encoder.processor.apply_chat_template(
        [{"role": "user", "content": "Define beam."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        **encoder.render_kwargs,
    )
    assert inputs["input_ids"][0, -1].item() == prompt
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated[0, inputs["input_ids"].shape[1] :].tolist() == [stop_id]  # stopped after the first token
    assert generate_answers(
        model, encoder, get_architecture("llama"), [record], SHAPES, max_new_tokens=4, batch_size=1
    ) == [""]


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "mllama"])
def test_llava_placeholders_train_exactly_the_assistant_turns_in_the_real_vocabularies(arch):
    """A LLaVA record as users bring it: ``<image>\\n`` at the start of the first question, and (Qwen) another
    image mid-sentence in a later turn. The text beside each placeholder stays in its user turn and is masked."""
    architecture = get_architecture(arch)
    encoder = ChatEncoder(real_processor(arch), architecture.end_of_turn_token, DATE)
    later = "How many shapes are in <image> this one?" if arch == "qwen2_5_vl" else "How many shapes are there?"
    turns = [
        {"from": "human", "value": "<image>\nDescribe the picture."},
        {"from": "gpt", "value": ANSWERS[0]},
        {"from": "human", "value": later},
        {"from": "gpt", "value": ANSWERS[1]},
        {"from": "human", "value": "Are they small?"},
        {"from": "gpt", "value": ANSWERS[2]},
    ]
    count = 2 if arch == "qwen2_5_vl" else 1
    images = [f"images/train_{i:04d}.png" for i in range(count)]
    record = {**normalise_record({"conversations": turns, "image": images}), "source_line": 1}
    assert record["messages"][0]["content"][1] == {"type": "text", "text": "\nDescribe the picture."}
    encoded = encode_messages(encoder, record["messages"], load(record))
    assert decoded_label_spans(encoder, encoded) == expected(architecture.end_of_turn_token, "all_assistant_turns")
