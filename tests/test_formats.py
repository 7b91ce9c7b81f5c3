"""The dialects users bring (LLaVA, ShareGPT, OpenAI image_url, TRL, llava-instruct-mix rows) become exactly our
records; bad lines in them are quarantined with their reason; one train.jsonl is split deterministically; and
test records that leak from train are counted or rejected."""

from __future__ import annotations

import base64
import json
import shutil
from functools import partial
from pathlib import Path

import pytest
from conftest import copy_project, run_data_stages
from PIL import Image

from vlm_pipeline.data.dialects import (
    JSONL_DIALECTS,
    to_llava_mix,
    to_openai_base64,
    to_openai_path,
    write_dialect,
)
from vlm_pipeline.data.importing import import_dataset
from vlm_pipeline.data.splits import validate_splits
from vlm_pipeline.data.validation import FileValidator, validate_lines

SHAPES = Path(__file__).resolve().parents[1] / "data/01_raw/shapes_vqa"
MAX_PIXELS = 10**6


def line(record) -> bytes:
    return json.dumps(record).encode("utf-8")


def validated(folder: Path, split: str = "train", limit: int = 40, image_store: Path | None = None) -> list[dict]:
    lines = (folder / f"{split}.jsonl").read_bytes().splitlines()[:limit]
    result = validate_lines(lines, folder, max_image_pixels=MAX_PIXELS, image_store=image_store)
    assert result.quarantine == []
    return result.valid


@pytest.mark.parametrize("dialect", sorted(JSONL_DIALECTS))
def test_every_dialect_gives_our_records(dialect, tmp_path):
    ours = validated(SHAPES)
    store = tmp_path / "decoded"
    theirs = validated(write_dialect(SHAPES, tmp_path / dialect, dialect, splits=("train",)), image_store=store)
    assert [r["messages"] for r in theirs] == [r["messages"] for r in ours]
    for mine, other in zip(ours, theirs, strict=True):
        assert other["image_sha256"] == mine["image_sha256"]  # the same pixels, however the record names them
        if dialect == "openai_base64":  # decoded once into the image store, named by content hash
            (stored,) = other["images"]
            assert stored == str(store / "images" / f"{mine['image_sha256'][0]}.png")
            assert Path(stored).read_bytes() == (SHAPES / mine["images"][0]).read_bytes()
        else:
            assert other["images"] == mine["images"]


def test_llava_instruct_mix_rows_follow_their_image_index(tmp_path):
    """The image parts' ``index`` picks the image, whatever the order of the list."""
    (tmp_path / "images").mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / "images" / name)
    row = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"index": 1, "text": None, "type": "image"},
                    {"index": None, "text": "versus", "type": "text"},
                    {"index": 0, "text": None, "type": "image"},
                ],
            },
            {"role": "assistant", "content": [{"index": None, "text": "blue, red", "type": "text"}]},
        ],
        "images": ["images/a.png", "images/b.png"],
    }
    (record,) = validate_lines([line(row)], tmp_path, max_image_pixels=MAX_PIXELS).valid
    assert record["images"] == ["images/b.png", "images/a.png"]
    assert record["messages"][0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "versus"},
        {"type": "image"},
    ]
    mix = to_llava_mix(record, tmp_path)
    assert mix["messages"][0]["content"][0] == {"index": 0, "text": None, "type": "image"}
    assert mix["images"][0]["bytes"] == (tmp_path / "images/b.png").read_bytes()


def test_placeholders_stay_where_they_are(tmp_path):
    """An image in a later turn, mid-sentence, stays there (TRL would move it to the first user turn)."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / "a.png")
    row = {
        "system": "Answer briefly.",
        "conversations": [
            {"from": "human", "value": "Hello."},
            {"from": "gpt", "value": "Hi."},
            {"from": "human", "value": "Is this <image> red?"},
            {"from": "gpt", "value": "Yes."},
        ],
        "image": "images/a.png",
    }
    (record,) = validate_lines([line(row)], tmp_path, max_image_pixels=MAX_PIXELS).valid
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert record["messages"][3]["content"] == [
        {"type": "text", "text": "Is this "},
        {"type": "image"},
        {"type": "text", "text": " red?"},
    ]
    assert record["images"] == ["images/a.png"]


def text(value: str) -> dict:
    return {"type": "text", "text": value}


IMAGE = {"type": "image"}
# Lines as a user's file holds them, written by hand from each dialect's public description (not by our writer,
# which shares the reader's constants), with what they must read as: (role, parts) per turn, then the images.
HAND_WRITTEN = {
    "openai_image_url": (
        '{"messages": [{"role": "system", "content": "You compare shapes."}, {"role": "user", "content": [{"type": '
        '"text", "text": "Is this one"}, {"type": "image_url", "image_url": {"url": "images/b.png"}}, {"type": '
        '"text", "text": "larger than this one?"}, {"type": "image_url", "image_url": {"url": "images/a.png", '
        '"detail": "low"}}]}, {"role": "assistant", "content": "No, they are the same size."}]}',
        [
            ("system", [text("You compare shapes.")]),
            ("user", [text("Is this one"), IMAGE, text("larger than this one?"), IMAGE]),
            ("assistant", [text("No, they are the same size.")]),
        ],
        ["images/b.png", "images/a.png"],
    ),
    "trl_single_image": (
        '{"image": "images/a.png", "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", '
        '"text": "What colour is the square?"}]}, {"role": "assistant", "content": [{"type": "text", "text": '
        '"Red."}]}]}',
        [("user", [IMAGE, text("What colour is the square?")]), ("assistant", [text("Red.")])],
        ["images/a.png"],
    ),
    "llava": (
        '{"id": "000017", "image": "images/b.png", "conversations": [{"from": "human", "value": "<image>\\nWhat '
        'colour is the shape?"}, {"from": "gpt", "value": "Blue."}, {"from": "human", "value": "Is it filled?"}, '
        '{"from": "gpt", "value": "Yes, entirely."}]}',
        [
            ("user", [IMAGE, text("\nWhat colour is the shape?")]),
            ("assistant", [text("Blue.")]),
            ("user", [text("Is it filled?")]),
            ("assistant", [text("Yes, entirely.")]),
        ],
        ["images/b.png"],
    ),
    "sharegpt": (
        '{"conversations": [{"from": "human", "value": "<image><image>Which picture is blue?"}, {"from": "gpt", '
        '"value": "The second."}], "system": "Answer in a few words.", "images": ["images/a.png", "images/b.png"]}',
        [
            ("system", [text("Answer in a few words.")]),
            ("user", [IMAGE, IMAGE, text("Which picture is blue?")]),
            ("assistant", [text("The second.")]),
        ],
        ["images/a.png", "images/b.png"],
    ),
    "llava_instruct_mix_row": (
        '{"messages": [{"content": [{"index": 0, "text": null, "type": "image"}, {"index": null, "text": "What '
        'colour is this?", "type": "text"}], "role": "user"}, {"content": [{"index": null, "text": "Red.", '
        '"type": "text"}], "role": "assistant"}], "images": ["images/a.png"]}',
        [("user", [IMAGE, text("What colour is this?")]), ("assistant", [text("Red.")])],
        ["images/a.png"],
    ),
    "alpaca": (
        '{"instruction": "Give the plural of the word.", "input": "mouse", "output": "mice"}',
        [("user", [text("Give the plural of the word.\n\nmouse")]), ("assistant", [text("mice")])],
        [],
    ),
    "alpaca_no_input": (
        '{"instruction": "Name a primary colour.", "input": "", "output": "Red."}',
        [("user", [text("Name a primary colour.")]), ("assistant", [text("Red.")])],
        [],
    ),
}


@pytest.mark.parametrize("dialect", sorted(HAND_WRITTEN))
def test_a_hand_written_line_of_each_dialect_reads_as_its_turns(dialect, tmp_path):
    (tmp_path / "images").mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / "images" / name)
    written, turns, images = HAND_WRITTEN[dialect]
    result = validate_lines([written.encode()], tmp_path, max_image_pixels=MAX_PIXELS)
    assert result.quarantine == []
    (record,) = result.valid
    assert [(message["role"], message["content"]) for message in record["messages"]] == turns
    assert record["images"] == images


def test_a_mixed_bad_file_quarantines_each_line_with_its_reason(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "images" / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "outside.png")

    def turns(question: str, answer: str = "red") -> list[dict]:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    not_an_image = base64.b64encode(b"plain text, not pixels").decode()
    lines = [
        line({"conversations": turns("<image> Colour?"), "image": "images/a.png"}),  # 1 valid
        line({"conversations": turns("<image><image> Colours?"), "image": "images/a.png"}),  # 2: 2 vs 1
        line({"conversations": turns("Colour?"), "image": "images/a.png"}),  # 3: 0 vs 1
        line({"conversations": turns("<image> Colour?")}),  # 4: 1 vs 0
        line({"conversations": [{"from": "function_call", "value": "{}"}, {"from": "gpt", "value": "x"}]}),  # 5
        line({"conversations": [*turns("Hm?"), {"from": "observation", "value": "42"}]}),  # 6
        line({"conversations": turns("<image> Colour?"), "image": "https://example.com/a.png"}),  # 7
        line({"conversations": turns("<image> Colour?"), "images": ["data:image/png;base64,%%%"]}),  # 8
        line({"conversations": turns("<image> Colour?"), "image": f"data:image/png;base64,{not_an_image}"}),  # 9
        line({"conversations": turns("<image> Colour?"), "image": (tmp_path / "outside.png").as_uri()}),  # 10
        line({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),  # 11
        line({"conversations": turns("<image> Which colour?", "red"), "images": ["images/a.png"]}),  # 12 valid
    ]
    result = validate_lines(lines, root, max_image_pixels=MAX_PIXELS)
    reasons = {entry["line"]: entry["reason"] for entry in result.quarantine}
    assert reasons == {
        2: "image_count_mismatch",
        3: "image_count_mismatch",
        4: "image_count_mismatch",
        5: "unknown_role",
        6: "unknown_role",
        7: "remote_image",
        8: "bad_data_uri",
        9: "image_unreadable",
        10: "image_outside_root",
        11: "format_mismatch",
    }
    details = {entry["line"]: entry["detail"] for entry in result.quarantine}
    assert "2 <image> placeholder(s)" in details[2] and "lists 1 image(s)" in details[2]
    assert "0 <image>" in details[3] and "function_call" in details[5] and "observation" in details[6]
    assert "nothing is downloaded" in details[7]
    assert [record["source_line"] for record in result.valid] == [1, 12]
    report = result.report
    assert report["total"] == 12 == report["valid"] + report["quarantined"] == len(result.valid) + len(reasons)
    assert report["format"].startswith("conversations")
    assert not list((root / "images").glob("*.txt")) and len(list((root / "images").iterdir())) == 1


def shapes_lines(count: int, start: int = 0) -> list[bytes]:
    lines = (SHAPES / "train.jsonl").read_bytes().splitlines()
    return lines[start : start + count]


def split(train: list[bytes], test: list[bytes] | None, root: Path = SHAPES, **options) -> dict:
    validator = partial(FileValidator, root, max_image_pixels=MAX_PIXELS, duplicates="reject")
    options = {"test_fraction": 0.2, "leakage": "warn", **options}
    return validate_splits(train, test, validator, sink=list, **options)


def test_one_file_is_split_by_record_hash_and_appending_keeps_the_split():
    first = split(shapes_lines(200), None)
    test_lines = [record["source_line"] for record in first["test"].valid]
    assert 20 <= len(test_lines) <= 60, "about test_fraction of 200"
    assert first["train"].report["held_out_to_test"] == len(test_lines)
    assert first["test"].report["held_out_from"] == "train.jsonl"
    assert first["train"].report["total"] == 200 == len(first["train"].valid) + len(test_lines)
    assert split(shapes_lines(200), None)["test"].valid == first["test"].valid, "deterministic"

    grown = split(shapes_lines(200) + shapes_lines(200, start=200), None)
    grown_test = [record["source_line"] for record in grown["test"].valid]
    assert grown_test[: len(test_lines)] == test_lines, "earlier test records stay in test"
    assert len(grown_test) > len(test_lines)
    earlier_train = {record["source_line"] for record in first["train"].valid}
    assert earlier_train <= {record["source_line"] for record in grown["train"].valid}


def test_leakage_by_prompt_and_image_content(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(SHAPES / "images", root / "images")
    train = shapes_lines(30)
    leaked = json.loads(train[3])
    shutil.copy(root / leaked["images"][0], root / "images" / "renamed.png")  # same pixels, another name
    leaked["images"] = ["images/renamed.png"]
    leaked["messages"][-1]["content"][0]["text"] = "another answer"  # the prompt is what leaks
    fresh = json.loads(shapes_lines(1, start=100)[0])
    test = [line(leaked), line(fresh)]

    warned = split(train, test, root, leakage="warn")
    assert [r["source_line"] for r in warned["test"].valid] == [1, 2]
    assert warned["test"].report["overlap_with_train"] == {"count": 1, "policy": "warn"}

    rejected = split(train, test, root, leakage="reject")
    assert [r["source_line"] for r in rejected["test"].valid] == [2]
    (entry,) = rejected["test"].quarantine
    assert entry["line"] == 1 and entry["reason"] == "train_test_overlap" and "train line 4" in entry["detail"]
    assert rejected["test"].report["total"] == 2 and rejected["test"].report["quarantined"] == 1


@pytest.mark.slow
def test_one_llava_file_through_the_kedro_data_stages(tmp_path, tiny_models):
    """A LLaVA train.jsonl alone: the test split is held out of it, and every line is accounted for on disk."""
    from datasets import load_from_disk

    project = copy_project(tmp_path / "project")
    raw = write_dialect(SHAPES, tmp_path / "llava", "llava", splits=("train",))
    primary = run_data_stages(project, raw_data=str(raw), base_model=str(tiny_models["qwen2_5_vl"]))

    out = project / "data/02_intermediate"
    train_report = json.loads((out / "train/report.json").read_text())
    test_report = json.loads((out / "test/report.json").read_text())
    assert train_report["format"] == "conversations (LLaVA, ShareGPT)"
    held = train_report["held_out_to_test"]
    assert test_report["held_out_from"] == "train.jsonl" and test_report["valid"] == held > 0
    valid = {split: (out / split / "valid.jsonl").read_text().splitlines() for split in ("train", "test")}
    assert len(valid["train"]) + len(valid["test"]) == train_report["total"] == 480
    assert len(load_from_disk(str(primary / "test"))) == held
    summary = json.loads((out / "validation_summary.json").read_text())
    assert summary["test_held_out_of_train"] is True and summary["test_overlap_with_train"] == 0


def write_openai_mixed(source: Path, dest: Path) -> Path:
    """OpenAI image_url lines, alternately a relative path and a base64 data URI."""
    dest.mkdir(parents=True)
    shutil.copytree(source / "images", dest / "images")
    for split in ("train", "test"):
        records = [json.loads(raw) for raw in (source / f"{split}.jsonl").read_text().splitlines()]
        rows = [
            (to_openai_base64 if index % 2 else to_openai_path)(record, source) for index, record in enumerate(records)
        ]
        (dest / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return dest


def write_llava_mix_parquet(source: Path, dest: Path) -> Path:
    """The shapes set as HuggingFaceH4/llava-instruct-mix-vsft's Parquet shards, imported with ``vlm-pipeline
    import`` as a user would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = dest / "hub/data"
    hub.mkdir(parents=True)
    for split in ("train", "test"):
        records = [json.loads(raw) for raw in (source / f"{split}.jsonl").read_text().splitlines()]
        pq.write_table(
            pa.Table.from_pylist([to_llava_mix(r, source) for r in records]), hub / f"{split}-00000-of-00001.parquet"
        )
    imported = dest / "imported"
    import_dataset(hub.parent, imported)
    return imported


SOURCES = {
    "llava": lambda source, dest: write_dialect(source, dest, "llava"),
    "sharegpt_images": lambda source, dest: write_dialect(source, dest, "sharegpt"),
    "openai_path_and_base64": write_openai_mixed,
    "trl_messages_image": lambda source, dest: write_dialect(source, dest, "trl_image"),
    "llava_instruct_mix_parquet": write_llava_mix_parquet,
}


# What the trainer reads of each Arrow row. ``image_paths`` is left out: a base64 image is decoded into the image
# store under its content hash, so only its path differs, and ``image_sha256`` pins the pixels.
TRAINED_COLUMNS = ["input_ids", "labels", "image_sha256", "source_line", "length"]


def trained_rows(primary: Path) -> dict[str, list[dict]]:
    from datasets import load_from_disk

    return {
        split: load_from_disk(str(primary / split)).select_columns(TRAINED_COLUMNS).to_list()
        for split in ("train", "test")
    }


@pytest.fixture(scope="module")
def our_rows(tmp_path_factory, tiny_models) -> dict[str, list[dict]]:
    """The shapes set in our own format through the same data stages: what tests/test_chain.py trains on."""
    project = copy_project(tmp_path_factory.mktemp("ours") / "project")
    return trained_rows(run_data_stages(project, raw_data=str(SHAPES), base_model=str(tiny_models["qwen2_5_vl"])))


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_each_dialect_trains_on_the_rows_our_format_gives(source, tmp_path, tiny_models, our_rows):
    """Data in each dialect through the Kedro data stages on the tiny Qwen2.5-VL: every train and test row the
    trainer and the evaluation read (tokens, labels, each image's content hash, its source line) equals our own
    format's, in order. Training is seeded, so the run from them is tests/test_chain.py's unshortened lora chain,
    which must gain 30 points of exact match over the base; training each dialect again would prove nothing more."""
    project = copy_project(tmp_path / "project")
    raw = SOURCES[source](SHAPES, tmp_path / source)
    theirs = trained_rows(run_data_stages(project, raw_data=str(raw), base_model=str(tiny_models["qwen2_5_vl"])))
    report = json.loads((project / "data/02_intermediate/train/report.json").read_text())
    assert report["quarantined"] == 0 and report["valid"] == 480
    for split in ("train", "test"):
        assert len(theirs[split]) == len(our_rows[split]) > 0
        differing = [i for i, (a, b) in enumerate(zip(theirs[split], our_rows[split], strict=True)) if a != b]
        assert not differing, f"{split} rows {differing[:5]} differ from our format's: {theirs[split][differing[0]]}"
