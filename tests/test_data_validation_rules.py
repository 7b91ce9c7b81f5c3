"""The data rules on real files: every reason code with its line number, normalisation, the reject budget,
and the committed sample data (deterministic, clean, balanced)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from test_video_data import VIDEO_DATA_REASONS

from vlm_pipeline import commands
from vlm_pipeline.data.formats import normalise_record
from vlm_pipeline.data.sample_data import write_sample_data
from vlm_pipeline.data.validation import (
    REASONS,
    DataValidationError,
    check_reject_budget,
    validate_lines,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ROOT = PROJECT_ROOT / "data" / "01_raw"
CONFIGURED_MAX_IMAGE_PIXELS = 12845056  # conf/base/parameters_data_validation.yml
SMALL_MAX_PIXELS = 1000  # so a 64x64 image (4096 pixels) is too large while 8x8 ones pass


def line(record) -> bytes:
    return json.dumps(record).encode("utf-8")


def vqa(image: str, question: str = "What color is it?", answer: str = "red") -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image],
    }


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` in its header but holds (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def png_bytes(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_root(tmp_path) -> Path:
    """A data folder with good, broken, oversized and escaping images (and one image outside it)."""
    root = tmp_path / "data"
    images = root / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(images / "red.png")
    Image.new("RGB", (8, 6), "blue").save(images / "blue.png")
    Image.new("RGB", (64, 64), "green").save(images / "big.png")
    rng = random.Random(0)
    noise = Image.frombytes("RGB", (24, 24), bytes(rng.randrange(256) for _ in range(24 * 24 * 3)))
    noise.save(images / "noise.png")
    full = (images / "noise.png").read_bytes()
    (images / "truncated.png").write_bytes(full[: len(full) // 2])
    (images / "text.png").write_text("this is not a PNG, just text with a .png name\n")
    (images / "bomb_error.png").write_bytes(png_header_only(20000, 20000))  # > 2x PIL's limit: PIL raises
    (images / "bomb_warning.png").write_bytes(png_header_only(10000, 10000))  # > PIL's limit: PIL warns
    Image.new("RGB", (8, 8), "white").save(tmp_path / "outside.png")
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    return root


def test_every_reason_code_on_its_own_line(image_root, tmp_path):
    valid_first = vqa("images/red.png")
    lines = [
        line(valid_first),  # 1 valid
        b"",  # 2 blank: not a record
        b'{"instruction": "caf\xe9", "output": "x"}',  # 3
        b'{"instruction": "unterminated',  # 4
        b"[1, 2, 3]",  # 5
        line({"question": "q", "answer": "a"}),  # 6
        line({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}),  # 7
        line({"messages": "hello"}),  # 8
        line({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),  # 9
        line({"messages": [{"role": "user", "content": "anyone?"}]}),  # 10
        line({**vqa("images/red.png"), "images": []}),  # 11
        line(vqa("images/does_not_exist.png")),  # 12
        line(vqa("images/truncated.png")),  # 13
        line(vqa("images/text.png")),  # 14
        line(vqa("../outside.png")),  # 15
        line(vqa(str(tmp_path / "outside.png"))),  # 16 absolute
        line(vqa("images/link.png")),  # 17 valid: a symlink inside the folder is followed (confinement is lexical)
        line(vqa("images/big.png")),  # 18 above max_image_pixels
        line(vqa("images/bomb_error.png")),  # 19
        line(vqa("images/bomb_warning.png")),  # 20
        line(valid_first),  # 21
        b"   \t\r",  # 22 whitespace only: not a record
        line({"instruction": "Define the term.", "input": "rebar", "output": "Steel bar in concrete."}),  # 23 alpaca
        line(
            {
                "messages": [
                    {"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                    {"role": "assistant", "content": "blue"},
                ],
                "images": ["images/blue.png"],
            }
        ),  # 24 valid, after every bad line
        line(vqa("https://example.com/red.png")),  # 25 nothing is downloaded
        line(vqa("data:image/png;base64,not*base64")),  # 26
        line(vqa("data:image/png;base64," + base64.b64encode(png_bytes("yellow")).decode())),  # 27 valid, stored
        line(vqa((image_root / "images" / "noise.png").as_uri(), question="Noise?")),  # 28 valid file:// URI
        line({**vqa("images/red.png", question="Which way?"), "videos": ["clips/a.mp4"]}),  # 29 video, no <video>
    ]
    store = tmp_path / "decoded"
    result = validate_lines(lines, image_root, max_image_pixels=SMALL_MAX_PIXELS, image_store=store)

    expected = {
        3: "not_utf8",
        4: "not_json",
        5: "not_object",
        6: "unknown_format",
        7: "missing_field",
        8: "bad_messages",
        9: "unknown_role",
        10: "no_assistant_turn",
        11: "image_count_mismatch",
        12: "image_missing",
        13: "image_unreadable",
        14: "image_unreadable",
        15: "image_outside_root",
        16: "image_outside_root",
        18: "image_too_large",
        19: "image_too_large",
        20: "image_too_large",
        21: "duplicate",
        23: "format_mismatch",
        25: "remote_image",
        26: "bad_data_uri",
        29: "video_count_mismatch",
    }
    assert {entry["line"]: entry["reason"] for entry in result.quarantine} == expected
    # train_test_overlap needs two splits (tests/test_formats.py); the video and media codes need clips and other
    # dialects (tests/test_video_data.py::test_every_video_reason_code_on_its_own_line).
    elsewhere = {"train_test_overlap", *VIDEO_DATA_REASONS}
    assert set(expected.values()) - elsewhere == set(REASONS) - elsewhere, "every reason code is exercised"
    assert [record["source_line"] for record in result.valid] == [1, 17, 24, 27, 28]
    # The data URI's image is stored by content hash in the store, named from the data folder (absolute: outside it).
    yellow = png_bytes("yellow")
    assert result.valid[3]["images"] == [str(store / f"images/{hashlib.sha256(yellow).hexdigest()}.png")]
    assert (image_root / result.valid[3]["images"][0]).read_bytes() == yellow
    assert result.valid[4]["images"] == ["images/noise.png"]
    assert result.valid[4]["image_sha256"] == [
        hashlib.sha256((image_root / "images/noise.png").read_bytes()).hexdigest()
    ]

    # The CLI on the same file: the same verdicts, and its three outputs reconcile.
    source = tmp_path / "all_reasons.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "cli_out"
    argv = [
        "validate",
        str(source),
        "--image-root",
        str(image_root),
        "--output-dir",
        str(out),
        "--max-image-pixels",
        str(SMALL_MAX_PIXELS),
    ]
    with pytest.raises(SystemExit) as exit_info:
        commands.main(argv)
    assert exit_info.value.code == 1, "22 of 27 quarantined is above the default 5% budget"
    cli_valid = (out / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    cli_quarantine = [json.loads(row) for row in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    cli_report = json.loads((out / "report.json").read_text())
    assert len(cli_valid) + len(cli_quarantine) == cli_report["total"] == 27
    assert {entry["line"]: entry["reason"] for entry in cli_quarantine} == expected
    assert [path.name for path in (out / "images").iterdir()] == [f"{hashlib.sha256(yellow).hexdigest()}.png"]

    for entry in result.quarantine:
        assert set(entry) == {"line", "reason", "detail", "raw"}
        assert entry["detail"] and entry["detail"][0] != " "
        assert entry["raw"] == lines[entry["line"] - 1].decode("utf-8", errors="replace")
    by_line = {entry["line"]: entry for entry in result.quarantine}
    assert "messages[0].role is missing" in by_line[7]["detail"]
    assert "alpaca" in by_line[23]["detail"] and "from line 1" in by_line[23]["detail"]
    assert "messages[0].role" in by_line[9]["detail"]
    assert "\ufffd" in by_line[3]["raw"]

    report = result.report
    assert report["total"] == 27 == len([raw for raw in lines if raw.strip()])
    assert report["valid"] + report["quarantined"] == report["total"]
    assert (report["valid"], report["quarantined"]) == (5, 22)
    assert report["reasons"] == dict(Counter(expected.values()))
    assert sum(report["reasons"].values()) == report["quarantined"]
    assert report["image_sizes"] == {  # red 8x8, white 8x8 (the link), blue 8x6, yellow 8x8 (data URI), noise 24x24
        "count": 5,
        "min_width": 8,
        "max_width": 24,
        "mean_width": 11.2,
        "min_height": 6,
        "max_height": 24,
        "mean_height": 10.8,
    }
    assert report["text_chars"]["min"] > 0


def test_a_symlinked_images_folder_is_followed_and_escapes_are_still_refused(tmp_path):
    """GPU hosts keep images on a big volume and link images/ to it: confinement is judged on the record's text
    (no absolute path, no '..'), never by where a link inside the data folder points."""
    volume = tmp_path / "big_volume" / "images"
    volume.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(volume / "red.png")
    Image.new("RGB", (8, 8), "white").save(tmp_path / "outside.png")
    root = tmp_path / "data"
    root.mkdir()
    (root / "images").symlink_to(volume, target_is_directory=True)
    lines = [
        line(vqa("images/red.png")),  # 1 through the linked folder
        line(vqa((root / "images" / "red.png").as_uri(), question="Colour?")),  # 2 file:// under the data folder
        line(vqa("images/../../outside.png")),  # 3
        line(vqa("images/../images/red.png", question="Hue?")),  # 4 '..' is refused even when it lands inside
        line(vqa(str(tmp_path / "outside.png"))),  # 5 absolute
        line(vqa((tmp_path / "outside.png").as_uri(), question="Shade?")),  # 6 file:// outside the folder
        line(vqa("images\\..\\..\\outside.png", question="Tint?")),  # 7 Windows separators
    ]
    result = validate_lines(lines, root, max_image_pixels=SMALL_MAX_PIXELS)
    assert [record["source_line"] for record in result.valid] == [1, 2]
    assert [record["images"] for record in result.valid] == [["images/red.png"], ["images/red.png"]]
    assert {entry["line"]: entry["reason"] for entry in result.quarantine} == dict.fromkeys(
        range(3, 8), "image_outside_root"
    )
    assert "'..'" in result.quarantine[0]["detail"] and "absolute" in result.quarantine[2]["detail"]


def test_valid_records_are_normalised_to_list_content_and_images(image_root):
    string_content = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    (record,) = validate_lines([line(string_content)], image_root, max_image_pixels=SMALL_MAX_PIXELS).valid
    assert record == {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
        ],
        "images": [],
        "image_sha256": [],
        "source_line": 1,
    }


@pytest.mark.parametrize(
    ("raw", "prompt"),
    [
        ({"instruction": "Define the term.", "input": "rebar", "output": "A steel bar."}, "Define the term.\n\nrebar"),
        ({"instruction": "Define rebar.", "input": "", "output": "A steel bar."}, "Define rebar."),
        ({"instruction": "Define rebar.", "output": "A steel bar."}, "Define rebar."),
    ],
)
def test_alpaca_becomes_one_user_and_one_assistant_turn(raw, prompt):
    assert normalise_record(raw) == {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A steel bar."}]},
        ],
        "images": [],
    }


def reason_of(record, image_root: Path) -> str | None:
    result = validate_lines([line(record)], image_root, max_image_pixels=SMALL_MAX_PIXELS)
    return result.quarantine[0]["reason"] if result.quarantine else None


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"output": "x"}, "missing_field"),  # instruction missing
        ({"instruction": "", "output": "x"}, "missing_field"),
        ({"instruction": 3, "output": "x"}, "missing_field"),
        ({"instruction": "Define.", "output": "   "}, "missing_field"),
        ({"instruction": "Define.", "input": 5, "output": "x"}, "missing_field"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "missing_field"),
        ({"messages": [{"role": "user", "content": []}, {"role": "assistant", "content": "a"}]}, "missing_field"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "missing_field"),
        ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, "missing_field"),
        ({"messages": []}, "bad_messages"),
        ({"messages": None}, "bad_messages"),
        ({"messages": ["hello", {"role": "assistant", "content": "a"}]}, "bad_messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "sound"}]}, {"role": "assistant", "content": "a"}]},
            "bad_messages",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "and?"},
                ]
            },
            "no_assistant_turn",
        ),
        ({**vqa("images/red.png"), "images": ["images/red.png", "images/blue.png"]}, "image_count_mismatch"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, None),
    ],
)
def test_structural_rules(record, reason, image_root):
    assert reason_of(record, image_root) == reason


def test_lines_python_reads_but_cannot_train_on_are_quarantined_not_raised(image_root):
    """Three lines that stopped validation with a traceback (no quarantine, no report) instead of being set aside: a
    lone surrogate escape, nesting past json's recursion limit, a turn's speaker that is a list."""
    lines = [
        b'{"instruction": "Define \\ud800 rebar.", "output": "A steel bar."}',  # 1 lone surrogate (escape)
        b'{"instruction": "Define \\ud83d\\ude00 joist.", "output": "A beam."}',  # 2 valid: a pair is one character
        b'{"instruction": "Define.", "output": "A slab.", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # 3
        line({"instruction": "Define lintel.", "output": "A beam over an opening."}),  # 4 valid
    ]
    result = validate_lines(lines, image_root, max_image_pixels=SMALL_MAX_PIXELS)
    by_line = {entry["line"]: entry for entry in result.quarantine}
    assert {number: entry["reason"] for number, entry in by_line.items()} == {1: "not_utf8", 3: "not_json"}
    assert "lone surrogate" in by_line[1]["detail"] and "nested deeper" in by_line[3]["detail"]
    assert [record["source_line"] for record in result.valid] == [2, 4]
    assert result.valid[0]["messages"][0]["content"][0]["text"] == "Define \U0001f600 joist."
    # A LLaVA/ShareGPT file (its format is its first record's): a speaker that is a list, not a name.
    conversations = [
        line({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
        line({"conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]}),
    ]
    (entry,) = validate_lines(conversations, image_root, max_image_pixels=SMALL_MAX_PIXELS).quarantine
    assert (entry["line"], entry["reason"]) == (2, "missing_field")
    assert entry["detail"] == "conversations[0].from is a list; expected a string"


def test_duplicates_keep_and_reject(image_root):
    same = line({"instruction": "Define.", "input": "joist", "output": "A member."})
    as_conversation = line(
        {"messages": [{"role": "user", "content": "Define.\n\njoist"}, {"role": "assistant", "content": "A member."}]}
    )
    lines = [same, same, as_conversation]
    rejected = validate_lines(lines, image_root, max_image_pixels=SMALL_MAX_PIXELS)
    assert [r["source_line"] for r in rejected.valid] == [1]
    # The same conversation in another format is not a duplicate but a line in the wrong format for this file.
    assert [(q["line"], q["reason"]) for q in rejected.quarantine] == [(2, "duplicate"), (3, "format_mismatch")]
    assert "line 1" in rejected.quarantine[0]["detail"]
    assert rejected.report["duplicates"] == {"count": 1, "policy": "reject"}
    kept = validate_lines(lines, image_root, max_image_pixels=SMALL_MAX_PIXELS, duplicates="keep")
    assert [r["source_line"] for r in kept.valid] == [1, 2] and len(kept.quarantine) == 1
    assert kept.report["duplicates"] == {"count": 1, "policy": "keep"}
    with pytest.raises(ValueError, match="duplicates"):
        validate_lines(lines, image_root, max_image_pixels=SMALL_MAX_PIXELS, duplicates="drop")


def test_a_copy_of_an_invalid_record_keeps_its_own_reason(image_root):
    missing = line(vqa("images/nowhere.png"))
    result = validate_lines([missing, missing], image_root, max_image_pixels=SMALL_MAX_PIXELS)
    assert [q["reason"] for q in result.quarantine] == ["image_missing", "image_missing"]


def alpaca_lines(count: int) -> list[bytes]:
    return [line({"instruction": "Define.", "input": f"term {index}", "output": "Meaning."}) for index in range(count)]


def test_reject_budget_raises_with_a_one_line_summary(image_root):
    lines = alpaca_lines(88) + [line({"instruction": "Define."})] * 7 + [b"{oops"] * 5
    report = validate_lines(lines, image_root, max_image_pixels=SMALL_MAX_PIXELS).report
    with pytest.raises(DataValidationError) as raised:
        check_reject_budget(report, 0.05, source="data/01_raw/x/train.jsonl")
    assert str(raised.value) == (
        "12 of 100 records (12.0%) quarantined in data/01_raw/x/train.jsonl, above the limit 5.0%: "
        "7 missing_field, 5 not_json; see quarantine.jsonl"
    )
    assert isinstance(raised.value, ValueError)
    check_reject_budget(report, 0.12)  # exactly at the limit passes


def test_reject_budget_within_limit_and_with_nothing_valid(image_root):
    within = validate_lines(alpaca_lines(95) + [b"[]"] * 5, image_root, max_image_pixels=SMALL_MAX_PIXELS).report
    check_reject_budget(within, 0.05)
    with pytest.raises(DataValidationError, match="0.0%"):
        check_reject_budget(within, 0.0)
    none_valid = validate_lines([b"[]", b"{}"], image_root, max_image_pixels=SMALL_MAX_PIXELS).report
    with pytest.raises(DataValidationError, match="2 of 2 records"):
        check_reject_budget(none_valid, 1.0)
    empty = validate_lines([b"", b"  "], image_root, max_image_pixels=SMALL_MAX_PIXELS).report
    assert empty["total"] == 0
    with pytest.raises(DataValidationError, match="no records"):
        check_reject_budget(empty, 1.0)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_sample_generator_is_deterministic_and_matches_the_committed_data(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    write_sample_data(first)
    write_sample_data(second)
    generated = tree_bytes(first)
    assert generated == tree_bytes(second)
    assert {name for name in generated if name.endswith(".jsonl")} == {
        "shapes_vqa/train.jsonl",
        "shapes_vqa/test.jsonl",
        "alpaca_glossary/train.jsonl",
        "alpaca_glossary/test.jsonl",
    }
    # The committed files are exactly what the generator writes (re-run it after changing it).
    for data_set in ("shapes_vqa", "alpaca_glossary"):
        assert tree_bytes(SAMPLE_ROOT / data_set) == tree_bytes(first / data_set)
    assert sum(len(data) for data in generated.values()) < 2 * 1024 * 1024


@pytest.mark.parametrize("data_set", ["shapes_vqa", "alpaca_glossary"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_committed_sample_data_validates_clean(data_set, split):
    folder = SAMPLE_ROOT / data_set
    lines = (folder / f"{split}.jsonl").read_bytes().splitlines()
    result = validate_lines(lines, folder, max_image_pixels=CONFIGURED_MAX_IMAGE_PIXELS)
    assert result.report["quarantined"] == 0, result.quarantine[:3]
    assert result.report["valid"] == len(lines)
    check_reject_budget(result.report, 0.0)


def test_shapes_answers_are_single_words_balanced_and_images_are_56px_rgb():
    folder = SAMPLE_ROOT / "shapes_vqa"
    for split, size in (("train", 480), ("test", 96)):
        records = [json.loads(raw) for raw in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert len(records) == size
        answers = Counter(record["messages"][-1]["content"][0]["text"] for record in records)
        assert set(answers) == {"red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle"}
        assert max(answers.values()) / len(records) <= 0.20
        assert len({record["images"][0] for record in records}) == size, "each record has its own image"
    with Image.open(folder / "images" / "train_0000.png") as image:
        assert (image.size, image.mode) == ((56, 56), "RGB")
