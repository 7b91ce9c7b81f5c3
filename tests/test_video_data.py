"""Video in the data formats and in validation (issue 28, items 1-2): every video and media reason code on real
clips, what validation reads from a clip, the dialects agreeing, and no media field or placeholder ever dropped."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_pipeline.data.clips import read_frames, write_clip
from vlm_pipeline.data.formats import normalise_record
from vlm_pipeline.data.validation import REASONS, validate_lines

# The codes this module exercises; tests/test_data_validation_rules.py exercises the others.
VIDEO_DATA_REASONS = {
    "video_count_mismatch",
    "video_missing",
    "video_unreadable",
    "video_too_long",
    "video_too_large",
    "video_outside_root",
    "remote_video",
    "audio_unsupported",
    "alpaca_media",
}
MAX_PIXELS = 2000  # 32x32 frames (1,024 pixels) pass, 64x64 ones (4,096) do not
MAX_SECONDS = 4.0


def moving_square(frames: int, side: int = 32, step: int = 2) -> list[np.ndarray]:
    """A white square moving right on black, one step per frame: every frame differs."""
    clip = []
    for index in range(frames):
        frame = np.zeros((side, side, 3), np.uint8)
        left = (index * step) % (side - 8)
        frame[12:20, left : left + 8] = 255
        clip.append(frame)
    return clip


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video_data")
    write_clip(root / "clips/a.mp4", moving_square(16), fps=8)  # 2 s
    write_clip(root / "clips/long.mp4", moving_square(40), fps=8)  # 5 s, over MAX_SECONDS
    write_clip(root / "clips/big.mp4", moving_square(4, side=64), fps=8)  # 64x64 frames, over MAX_PIXELS
    whole = (root / "clips/a.mp4").read_bytes()
    (root / "clips/truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (root / "clips/text.mp4").write_text("not a video\n")
    for index, frame in enumerate(moving_square(4)):
        (root / "frames/a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(root / f"frames/a/{index:03d}.png")
    (root / "frames/mixed").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "frames/mixed/0.png")
    Image.new("RGB", (16, 32)).save(root / "frames/mixed/1.png")
    (root / "frames/empty").mkdir(parents=True)
    (root / "images").mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "images/red.png")
    return root


def clip_question(video: str | None = None, *, listed: list[str] | None = None, **extra) -> dict:
    """A messages record asking about one video: the part carries ``video`` inline, or takes it from ``listed``."""
    part = {"type": "video", "video": video} if video is not None else {"type": "video"}
    return {
        "messages": [
            {"role": "user", "content": [part, {"type": "text", "text": "Where does it move?"}]},
            {"role": "assistant", "content": "right"},
        ],
        **({"videos": listed} if listed is not None else {}),
        **extra,
    }


def validate(records: list[dict], root: Path):
    lines = [json.dumps(record).encode() for record in records]
    return validate_lines(lines, root, max_image_pixels=MAX_PIXELS, max_video_seconds=MAX_SECONDS)


def reasons(result) -> dict[int, str]:
    return {entry["line"]: entry["reason"] for entry in result.quarantine}


def test_every_video_reason_code_on_its_own_line(video_root):
    messages = [
        clip_question(listed=["clips/a.mp4"]),  # 1 valid
        clip_question("frames/a"),  # 2 valid: a folder of frames
        clip_question(listed=["clips/none.mp4"]),  # 3
        clip_question(listed=["clips/truncated.mp4"]),  # 4
        clip_question(listed=["clips/text.mp4"]),  # 5
        clip_question(listed=["clips/long.mp4"]),  # 6
        clip_question(listed=["clips/big.mp4"]),  # 7
        clip_question(listed=["../a.mp4"]),  # 8
        clip_question(listed=["https://example.com/a.mp4"]),  # 9 nothing is downloaded
        clip_question("frames/mixed"),  # 10 frames of two sizes
        clip_question("frames/empty"),  # 11
        {**clip_question(listed=["clips/a.mp4"]), "videos": ["clips/a.mp4", "frames/a"]},  # 12 two listed, one part
        {**clip_question(listed=["clips/a.mp4"]), "audios": ["a.wav"]},  # 13
        {  # 14
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {}}, {"type": "text", "text": "?"}],
                },
                {"role": "assistant", "content": "a"},
            ]
        },
        {  # 15 valid: an image and a video in one turn
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same?"}]},
                {"role": "assistant", "content": "no"},
            ],
            "images": ["images/red.png"],
            "videos": ["clips/a.mp4"],
        },
    ]
    result = validate(messages, video_root)
    assert reasons(result) == {
        3: "video_missing",
        4: "video_unreadable",
        5: "video_unreadable",
        6: "video_too_long",
        7: "video_too_large",
        8: "video_outside_root",
        9: "remote_video",
        10: "video_unreadable",
        11: "video_unreadable",
        12: "video_count_mismatch",
        13: "audio_unsupported",
        14: "audio_unsupported",
    }
    assert [record["source_line"] for record in result.valid] == [1, 2, 15]
    by_line = {entry["line"]: entry["detail"] for entry in result.quarantine}
    assert "lasts 5.0 s, above data_validation.max_video_seconds 4" in by_line[6]
    assert "differ in size (16x32, 32x32)" in by_line[10]

    alpaca = [
        {"instruction": "Describe it.", "output": "x", "videos": ["clips/a.mp4"]},
        {"instruction": "<video>\nDescribe it.", "output": "x"},
        {"instruction": "Transcribe.", "input": "<audio>", "output": "x"},
        {"instruction": "Describe it.", "output": "x", "images": ["images/red.png"]},
    ]
    assert reasons(validate(alpaca, video_root)) == {
        1: "alpaca_media",
        2: "alpaca_media",
        3: "alpaca_media",
        4: "alpaca_media",
    }

    conversations = [
        {"conversations": [{"from": "human", "value": "<audio>What is said?"}, {"from": "gpt", "value": "hi"}]},
        {"conversations": [{"from": "human", "value": "<video>Where?"}, {"from": "gpt", "value": "left"}]},
    ]
    assert reasons(validate(conversations, video_root)) == {1: "audio_unsupported", 2: "video_count_mismatch"}
    exercised = {"video_missing", "video_unreadable", "video_too_long", "video_too_large", "video_outside_root"}
    exercised |= {"remote_video", "video_count_mismatch", "audio_unsupported", "alpaca_media"}
    assert exercised == VIDEO_DATA_REASONS <= set(REASONS)


def test_validation_reads_each_clip_once_and_the_report_counts_seconds(video_root):
    result = validate([clip_question(listed=["clips/a.mp4"]), clip_question("frames/a")], video_root)
    clip, folder = result.valid
    assert clip["videos"] == ["clips/a.mp4"] and folder["videos"] == ["frames/a"]
    assert clip["video_sha256"] == [hashlib.sha256((video_root / "clips/a.mp4").read_bytes()).hexdigest()]
    assert clip["video_info"] == [{"frames": 16, "fps": 8.0, "seconds": 2.0, "width": 32, "height": 32}]
    # A folder plays at data_validation.frame_folder_fps (2 by default): 4 frames are 2 s.
    assert folder["video_info"] == [{"frames": 4, "fps": 2.0, "seconds": 2.0, "width": 32, "height": 32}]
    assert result.report["videos"] == {"count": 2, "min_seconds": 2.0, "max_seconds": 2.0, "mean_seconds": 2.0}
    # The frames a clip decodes to are the ones written (x264 at crf 18 is near lossless on flat colours).
    first, last = read_frames(video_root / "clips/a.mp4", [0, 15])
    assert np.abs(first.astype(int) - moving_square(16)[0]).mean() < 3
    assert np.abs(last.astype(int) - moving_square(16)[15]).mean() < 3


def test_a_text_only_set_reports_as_before_video_existed(video_root):
    result = validate(
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}], video_root
    )
    assert "videos" not in result.report and "videos" not in result.valid[0]


def test_a_clip_edited_in_place_is_another_record_and_a_repeat_is_a_duplicate(video_root, tmp_path):
    root = tmp_path / "data"
    write_clip(root / "clips/a.mp4", moving_square(16), fps=8)
    write_clip(root / "clips/b.mp4", moving_square(16, step=1), fps=8)
    records = [clip_question(listed=["clips/a.mp4"]), clip_question(listed=["clips/b.mp4"])]
    result = validate([*records, records[0]], root)
    assert reasons(result) == {3: "duplicate"}
    before = result.valid[0]["video_sha256"]
    write_clip(root / "clips/a.mp4", moving_square(16, step=3), fps=8)
    assert validate(records[:1], root).valid[0]["video_sha256"] != before


# The LLaVA/ShareGPT record issue 28 measured passing validation as text (main at 79576e8).
LLAVA_VIDEO = {
    "conversations": [{"from": "human", "value": "<video>\nWhere does it move?"}, {"from": "gpt", "value": "left"}],
    "videos": ["clips/a.mp4"],
}


def test_the_dialects_write_the_same_video_record():
    messages = {
        "messages": [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "\nWhere does it move?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "left"}]},
        ],
        "videos": ["clips/a.mp4"],
    }
    inline = {**messages, "videos": None}
    inline["messages"] = [
        {"role": "user", "content": [{"type": "video", "video": "clips/a.mp4"}, messages["messages"][0]["content"][1]]},
        messages["messages"][1],
    ]
    placeholder = {"messages": [{"role": "user", "content": "<video>\nWhere does it move?"}, messages["messages"][1]]}
    expected = normalise_record(messages)
    assert expected == {
        "messages": [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "\nWhere does it move?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "left"}]},
        ],
        "images": [],
        "videos": ["clips/a.mp4"],
    }
    assert normalise_record(LLAVA_VIDEO) == expected
    assert normalise_record({**LLAVA_VIDEO, "videos": None, "video": "clips/a.mp4"}) == expected
    assert normalise_record({key: value for key, value in inline.items() if value is not None}) == expected
    assert normalise_record({**placeholder, "videos": ["clips/a.mp4"]}) == expected


MEDIA_NAMES = ("videos", "<video>", "audios", "<audio>")


def carrying(dialect: str, media: str) -> dict:
    """A record of ``dialect`` whose only media is ``media``: a field naming a file, or a placeholder in its text."""
    field = media if not media.startswith("<") else None
    text = f"{media}\nWhat happens?" if field is None else "What happens?"
    extra = {field: ["clips/a.mp4" if field == "videos" else "a.wav"]} if field else {}
    if dialect == "alpaca":
        return {"instruction": text, "output": "it moves", **extra}
    if dialect == "conversations":
        return {"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "it moves"}], **extra}
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "it moves"}], **extra}


@pytest.mark.parametrize("media", MEDIA_NAMES)
@pytest.mark.parametrize("dialect", ["messages", "conversations", "alpaca"])
def test_no_media_field_or_placeholder_is_dropped_silently(dialect, media, video_root):
    """Each is used (a video part and its clip, with placeholder and field matched) or quarantined with its reason;
    never a valid record that lost it or trains it as words."""
    result = validate([carrying(dialect, media)], video_root)
    assert not result.valid, f"a {dialect} record with only {media} was kept: {result.valid}"
    (entry,) = result.quarantine
    if media == "audios":  # refused in every dialect before its format is read
        expected = "audio_unsupported"
    elif dialect == "alpaca":
        expected = "alpaca_media"
    else:  # a field with no part to fill, a part with no file, or audio
        expected = {"videos": "video_count_mismatch", "<video>": "video_count_mismatch"}.get(media, "audio_unsupported")
    assert entry["reason"] == expected, entry
    both = carrying(dialect, "<video>") | {"videos": ["clips/a.mp4"]}
    if dialect != "alpaca":  # the placeholder and the field together are a video record
        (record,) = validate([both], video_root).valid
        assert record["videos"] == ["clips/a.mp4"]
        assert [part["type"] for part in record["messages"][0]["content"]] == ["video", "text"]


@pytest.mark.parametrize(("architecture", "named"), [("mllama", "MllamaProcessor"), ("llama", "Tokenizer")])
def test_a_family_without_video_sets_video_records_aside_naming_itself(architecture, named, tiny_models, video_root):
    """Mllama and Llama 3.1 read no video: each video record is set aside with the processor named, and the text
    record beside it still encodes."""
    from conftest import chat_encoder

    from vlm_pipeline.data.encoding import encode_record

    encoder = chat_encoder(tiny_models[architecture])
    (record,) = validate([clip_question(listed=["clips/a.mp4"])], video_root).valid
    row = encode_record(
        encoder, record, video_root, max_length=4096, train_on="all_assistant_turns", truncate_text_only=False
    )
    assert (row["reason"], row["input_ids"], row["source_line"]) == ("video_unsupported", [], 1)
    assert named in row["detail"] and "reads no video" in row["detail"]
    text = {"messages": [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "right"}]}
    (kept,) = validate([text], video_root).valid
    kept_row = encode_record(
        encoder, kept, video_root, max_length=4096, train_on="all_assistant_turns", truncate_text_only=False
    )
    assert kept_row["reason"] is None and kept_row["label_tokens"] > 0


def test_the_video_demo_is_deterministic_small_and_only_its_frames_tell_the_answer(tmp_path):
    """The committed motion_vqa is what the generator writes, under 3 MB, validates clean, balances its answers,
    and puts the middle frame's square in the same box for every direction (so one frame cannot tell)."""
    from test_data_validation_rules import SAMPLE_ROOT, tree_bytes

    from vlm_pipeline.data import sample_videos

    first = sample_videos.write_motion_vqa(tmp_path / "first")
    second = sample_videos.write_motion_vqa(tmp_path / "second")
    generated = tree_bytes(first)
    assert generated == tree_bytes(second) == tree_bytes(SAMPLE_ROOT / "motion_vqa")
    assert sum(len(data) for data in generated.values()) < 3 * 1024 * 1024
    for name, clip_frames in (("train.jsonl", 16), ("test.jsonl", 16), ("test_one_frame.jsonl", 1)):
        lines = (first / name).read_bytes().splitlines()
        result = validate_lines(lines, first, max_image_pixels=10**6)
        assert result.report["quarantined"] == 0 and len(result.valid) == len(lines)
        assert {info["frames"] for record in result.valid for info in record["video_info"]} == {clip_frames}
        answers = Counter(record["messages"][-1]["content"][0]["text"] for record in result.valid)
        assert set(answers) == set(sample_videos.DIRECTIONS) and len(set(answers.values())) == 1, answers
    reach = sample_videos.TRAVEL // 2 + sample_videos.SQUARE // 2 + 1
    rng = __import__("random").Random(0)
    for direction in sample_videos.DIRECTIONS:
        frames = [sample_videos.moving_square(direction, rng) for _ in range(50)]
        middles = [np.argwhere(clip[sample_videos.FRAMES // 2].max(axis=2) > 24).mean(axis=0) for clip in frames]
        # Frame 8 of 0-15 is half a step past the middle: within a pixel of the box, along either axis.
        assert all(reach - 2 <= value <= sample_videos.SIDE - reach + 1 for middle in middles for value in middle)
