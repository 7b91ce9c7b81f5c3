"""Video records through preprocessing and collation (issue 28, items 3-4): Qwen's frame sampling, exact labels
with video parts on the twin and on the real 152k vocabulary, the video-token count the processor gives, and the
collator feeding the very frames preprocessing counted to a real forward and backward pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import chat_encoder
from datasets import Dataset
from PIL import Image
from real_tokenizers import real_processor
from test_packing import TOLERANCE, gradients, label_count, real_vocabulary_model, relative_error, twin
from test_token_budget import MODEL_CONFIGS, accelerate_file
from test_video_data import moving_square

from vlm_pipeline.architectures import get_architecture, load_model, qwen2_5_vl
from vlm_pipeline.config import MethodParams
from vlm_pipeline.config.schema import PreprocessingParams, SFTParams, VideoSampling
from vlm_pipeline.data.clips import write_clip
from vlm_pipeline.data.encoding import IGNORE_INDEX, encode_record
from vlm_pipeline.data.labels import ChatEncoder
from vlm_pipeline.data.validation import validate_lines
from vlm_pipeline.data.video_sampling import sample_frames, saved_sampling
from vlm_pipeline.planning.plan import build_plan, training_data
from vlm_pipeline.training.collator import SFTCollator

# (frames, fps, sampling) -> (indices, sampled fps), worked by hand from qwen-vl-utils' smart_nframes: frames / fps
# seconds at sampling.fps, within min_frames..min(max_frames, frames) rounded to pairs, spread first to last.
SAMPLING_CASES = [
    ((16, 8.0, {}), ([0, 5, 10, 15], 2.0)),  # 2 s at 2 fps: 4 frames
    ((300, 30.0, {}), ([round(i * 299 / 19) for i in range(20)], 2.0)),  # 10 s: 20 frames
    ((300, 30.0, {"max_frames": 8}), ([round(i * 299 / 7) for i in range(8)], 0.8)),
    ((10, 30.0, {}), ([0, 3, 6, 9], 12.0)),  # 1/3 s wants 0.7 frames: min_frames 4
    ((3, 1.0, {}), ([0, 2], 2 / 3)),  # fewer frames than min_frames: whole pairs of what there is
    ((1, 25.0, {}), ([0], 25.0)),  # one frame: the processor repeats it into a temporal patch
]


@pytest.mark.parametrize(("clip", "expected"), SAMPLING_CASES)
def test_frames_are_sampled_by_qwens_rule(clip, expected):
    frames, fps, overrides = clip
    chosen = sample_frames(frames, fps, VideoSampling(**overrides), temporal_patch=2)
    assert (chosen.indices, pytest.approx(chosen.sampled_fps)) == (expected[0], pytest.approx(expected[1]))
    assert chosen == sample_frames(frames, fps, VideoSampling(**overrides), temporal_patch=2)  # every rerun


# Three clip shapes: a square clip, a wide one at another rate, and a folder of tall frames.
CLIPS = {"square": (16, 8, 56, 56), "wide": (30, 10, 84, 112), "folder": (4, None, 112, 56)}


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    for name, (frames, fps, height, width) in CLIPS.items():
        shot = [frame[:height, :width] for frame in moving_square(frames, side=max(height, width))]
        if fps is None:
            (root / name).mkdir()
            for index, frame in enumerate(shot):
                Image.fromarray(frame).save(root / name / f"{index:02d}.png")
        else:
            write_clip(root / f"{name}.mp4", shot, fps=fps)
    Image.new("RGB", (56, 56), "red").save(root / "red.png")
    return root


def video_record(root: Path, clip: str, *, image: bool = False) -> dict:
    """Two turns: a video (and optionally an image) with a question, then a follow-up without media."""
    first = [{"type": "video"}, *([{"type": "image"}] if image else []), {"type": "text", "text": "Where does it go?"}]
    raw = {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": first},
            {"role": "assistant", "content": "right"},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "stops"},
        ],
        "videos": [clip if clip in ("folder",) else f"{clip}.mp4"],
        **({"images": ["red.png"]} if image else {}),
    }
    (record,) = validate_lines([json.dumps(raw).encode()], root, max_image_pixels=10**7).valid
    return record


def encode(encoder: ChatEncoder, record: dict, root: Path) -> dict:
    return encode_record(
        encoder,
        record,
        root,
        max_length=10**5,
        train_on="all_assistant_turns",
        truncate_text_only=False,
        video_sampling=VideoSampling(),
    )


def trained_spans(encoder: ChatEncoder, row: dict) -> list[str]:
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(encoder.tokenizer.decode(current))
            current = []
    return spans + ([encoder.tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("clip", sorted(CLIPS))
@pytest.mark.parametrize("vocabulary", ["twin", "real_152k"])
def test_a_video_record_trains_exactly_its_answers_with_the_processors_video_tokens(
    clip, vocabulary, clip_root, tiny_models
):
    if vocabulary == "twin":
        encoder = chat_encoder(tiny_models["qwen2_5_vl"])
    else:  # the real tokenizer in the real processor classes and settings, bounded as load_processor bounds them
        processor = real_processor("qwen2_5_vl")
        qwen2_5_vl.bound_videos(processor, {})
        encoder = ChatEncoder(processor, qwen2_5_vl.IM_END, {})
    record = video_record(clip_root, clip)
    row = encode(encoder, record, clip_root)
    assert row["reason"] is None, row["detail"]
    assert trained_spans(encoder, row) == ["right<|im_end|>", "stops<|im_end|>"]
    (sample,) = json.loads(row["video_samples"])
    frames, fps, height, width = CLIPS[clip]
    chosen = sample_frames(frames, fps or 2.0, VideoSampling(), temporal_patch=2)
    assert (sample["indices"], sample["sampled_fps"]) == (chosen.indices, chosen.sampled_fps)
    # The video tokens in the row are what the processor gives this clip shape (its own count from sizes).
    video_pad = encoder.tokenizer.convert_tokens_to_ids(qwen2_5_vl.VIDEO_PAD)
    counted = encoder.processor._get_num_multimodal_tokens(video_sizes=[(len(chosen.indices), height, width)])
    assert row["input_ids"].count(video_pad) == counted.num_video_tokens[0] > 0


def test_the_collator_feeds_the_recorded_frames_to_a_real_step(clip_root, tiny_models):
    """Rows with a video, a video and an image, and text only, padded into one batch: the model's modality ids mark
    image (1) and video (2) tokens, the seconds per temporal patch follow the sampled rate, and one forward and
    backward pass gives a finite loss with gradients in the vision tower."""
    model_dir = tiny_models["qwen2_5_vl"]
    encoder = chat_encoder(model_dir)
    text = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (text_record,) = validate_lines([json.dumps(text).encode()], clip_root, max_image_pixels=10**7).valid
    rows = [
        encode(encoder, video_record(clip_root, "square"), clip_root),
        encode(encoder, video_record(clip_root, "wide", image=True), clip_root),
        encode(encoder, text_record, clip_root),
    ]
    collator = SFTCollator(encoder.processor, get_architecture("qwen2_5_vl"), clip_root)
    batch = collator(rows)
    ids = batch["input_ids"]
    video_pad = encoder.tokenizer.convert_tokens_to_ids(qwen2_5_vl.VIDEO_PAD)
    image_pad = encoder.tokenizer.convert_tokens_to_ids(qwen2_5_vl.IMAGE_PAD)
    assert torch.equal(batch["mm_token_type_ids"], (ids == image_pad).long() + 2 * (ids == video_pad).long())
    grids = batch["video_grid_thw"]
    assert grids.shape == (2, 3) and int(grids.prod(dim=1).sum()) == batch["pixel_values_videos"].shape[0]
    assert int(grids.prod(dim=1).sum()) // 4 == int((ids == video_pad).sum())  # 2x2 merge: 4 patches a token
    sampled = [json.loads(row["video_samples"])[0]["sampled_fps"] for row in rows[:2]]
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([2 / fps for fps in sampled])
    model = load_model(model_dir)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    vision_grads = [p.grad for name, p in model.named_parameters() if name.startswith("model.visual.")]
    assert any(grad is not None and grad.abs().sum() > 0 for grad in vision_grads)


@pytest.mark.parametrize("vocabulary", ["twin", "real_152k"])
def test_packed_video_rows_train_as_their_records_one_at_a_time(clip_root, tiny_models, vocabulary):
    """Records with a video, a video and an image, text only, and a frame folder, packed into one row: each
    record's M-RoPE positions are what the model's ``get_rope_index`` gives it alone (a video's temporal positions
    step by its seconds per patch × ``tokens_per_second``), and the packed loss and every gradient equal the
    token-weighted sum of the records run alone (as tests/test_packing.py proves for images)."""
    model, processor = twin(tiny_models, "sdpa") if vocabulary == "twin" else real_vocabulary_model("sdpa")
    qwen2_5_vl.bound_videos(processor, {})  # as load_processor bounds it
    assert model.config.vision_config.tokens_per_second == 2  # the real checkpoint's; time is not a size
    encoder = ChatEncoder(processor, qwen2_5_vl.IM_END, {})
    text = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (text_record,) = validate_lines([json.dumps(text).encode()], clip_root, max_image_pixels=10**7).valid
    records = [
        video_record(clip_root, "wide", image=True),
        text_record,
        video_record(clip_root, "square"),
        video_record(clip_root, "folder"),
    ]
    rows = [encode(encoder, record, clip_root) for record in records]
    architecture = get_architecture("qwen2_5_vl")
    packed = SFTCollator(processor, architecture, clip_root, padding_free=True, model_config=model.config)(rows)
    alone = [SFTCollator(processor, architecture, clip_root)([row]) for row in rows]

    start = 0
    for row, batch in zip(rows, alone, strict=True):
        expected, _ = model.model.get_rope_index(
            batch["input_ids"],
            batch.get("mm_token_type_ids", torch.zeros_like(batch["input_ids"])),
            image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"),
            second_per_grid_ts=batch.get("second_per_grid_ts"),
        )
        n = len(row["input_ids"])
        assert packed["position_ids"][0, 0, start : start + n].tolist() == list(range(n))
        assert torch.equal(packed["position_ids"][1:, :, start : start + n], expected), f"record at {start}"
        start += n

    model.train()
    model.zero_grad()
    packed_loss = model(**packed).loss
    packed_loss.backward()
    packed_gradients = gradients(model)
    model.zero_grad()
    tokens = [label_count(batch["labels"]) for batch in alone]
    assert label_count(packed["labels"]) == sum(tokens)
    summed = torch.zeros(())
    for batch, count in zip(alone, tokens, strict=True):
        loss = model(**batch).loss * count / sum(tokens)
        loss.backward()
        summed = summed + loss.detach()
    assert relative_error(packed_loss.detach(), summed) < TOLERANCE, (packed_loss.item(), summed.item())
    single_gradients = gradients(model)
    errors = {name: relative_error(packed_gradients[name], single_gradients[name]) for name in single_gradients}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, f"{worst}: {errors[worst]:.2e}"
    assert any(name.startswith("model.visual.") for name in packed_gradients), "the frames reach the loss"


def test_video_frame_bounds_reach_the_processor(tiny_models):
    """preprocessing.videos' pixel bounds set the video processor's (not the image processor's), and Qwen's
    per-frame share of total_pixels is on for every video."""
    from vlm_pipeline.architectures import load_chat_encoder

    sampling = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16, "total_pixels": 28 * 28 * 900}
    encoder = load_chat_encoder(tiny_models["qwen2_5_vl"], PreprocessingParams(videos=sampling))
    video = encoder.processor.video_processor
    assert (video.size["shortest_edge"], video.size["longest_edge"]) == (3136, 12544)
    assert video.cap_pixels_per_frame is True and video.max_video_tokens == 1000
    assert encoder.processor.image_processor.size["longest_edge"] == 12_845_056  # images keep their own


def test_a_saved_folder_says_how_its_run_sampled_frames(tiny_models, tmp_path):
    """preprocessing.videos' fps and frame limits go into the video processor's own fields, so the folder training
    saves (and the merge, which reloads it without settings, saves again) tells ``predict --video`` how its run
    sampled; a checkpoint never trained here gives the schema's defaults. The processor samples nothing itself."""
    from vlm_pipeline.architectures import load_chat_encoder, load_processor

    sampling = {"fps": 1.0, "min_frames": 2, "max_frames": 6}
    processor = load_chat_encoder(tiny_models["qwen2_5_vl"], PreprocessingParams(videos=sampling)).processor
    assert processor.video_processor.do_sample_frames is False
    processor.save_pretrained(tmp_path / "trained")
    architecture = get_architecture("qwen2_5_vl")  # a processor folder has no config.json to read it from
    load_processor(tmp_path / "trained", architecture=architecture).save_pretrained(tmp_path / "merged")
    assert saved_sampling(tmp_path / "merged") == VideoSampling(**sampling)
    assert saved_sampling(tiny_models["qwen2_5_vl"]) == VideoSampling()


@pytest.mark.parametrize(
    ("shape", "sampling"),
    [
        ((4, 56, 56), {}),  # the demo's clip, as sampled
        ((20, 84, 112), {"max_pixels": 28 * 28 * 4}),  # wide, each frame bounded
        ((30, 252, 168), {"total_pixels": 28 * 28 * 60}),  # the per-frame share of the total binds
    ],
)
def test_the_planners_video_token_count_is_the_processors(shape, sampling, tiny_models):
    from vlm_pipeline.architectures import load_chat_encoder

    processor = load_chat_encoder(tiny_models["qwen2_5_vl"], PreprocessingParams(videos=sampling)).processor
    frames, height, width = shape
    processed = processor.video_processor(videos=[[np.zeros((height, width, 3), np.uint8)] * frames])
    expected = int(torch.as_tensor(processed["video_grid_thw"]).prod()) // 4
    assert qwen2_5_vl.video_tokens(processor, frames, height, width) == expected
    own_rule = processor._get_num_multimodal_tokens(video_sizes=[shape]).num_video_tokens[0]
    assert (own_rule == expected) == ("total_pixels" not in sampling)  # the rule alone misses the share


def test_inspect_labels_shows_a_video_records_trained_tokens(clip_root, tiny_models, tmp_path, capsys):
    from vlm_pipeline import commands

    raw = {
        "conversations": [{"from": "human", "value": "<video>Where does it go?"}, {"from": "gpt", "value": "right"}],
        "videos": ["square.mp4"],
    }
    data = tmp_path / "clips.jsonl"
    data.write_text(json.dumps(raw) + "\n", encoding="utf-8")
    argv = ["inspect-labels", str(data), "--model", str(tiny_models["qwen2_5_vl"]), "--image-root", str(clip_root)]
    with pytest.raises(SystemExit) as exit_info:
        commands.main(argv)
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert f"{data}:1" in shown and "[[right<|im_end|>]]" in shown, shown
    # 4 sampled 56x56 frames: 2 x 4 x 4 patches, merged 2x2 into 8 tokens, which the preview writes once with a count.
    assert f"<|vision_start|>{qwen2_5_vl.VIDEO_PAD}×8<|vision_end|>Where does it go?" in shown, shown


def test_video_rows_are_batched_with_image_rows_so_ranks_stay_aligned():
    """The modality a batch is grouped by is the vision tower's: a video row goes with image rows (both gather the
    tower under ZeRO-3), a text row apart."""
    from datasets import Dataset

    from vlm_pipeline.data.encoding import vision_rows
    from vlm_pipeline.training.sampler import ModalityGroupedSampler

    video = json.dumps([{"path": "a.mp4", "indices": [0, 1], "sampled_fps": 2.0}])
    rows = {"image_paths": [["a.png"], [], [], ["b.png"], []], "video_samples": ["", video, "", "", video]}
    assert vision_rows(Dataset.from_dict(rows)) == [True, True, False, True, True]
    order = list(ModalityGroupedSampler(vision_rows(Dataset.from_dict(rows)), batch_size=2, seed=0))
    for batch in [order[i : i + 2] for i in range(0, len(order), 2)]:
        assert len({rows["image_paths"][i] != [] or rows["video_samples"][i] != "" for i in batch}) == 1, batch


def test_the_plan_counts_each_videos_patches_in_the_vision_towers_memory(clip_root, tiny_models, tmp_path):
    """Each row records its videos' patches as the collator lays them out for the vision tower (``video_grid_thw``),
    and the plan of the real Qwen2.5-VL over these rows charges the vision tower for them: as much as for images of
    the same patches, and more than for the rows without their videos. Its steps batch video rows apart from text
    rows, as the trainer's sampler does."""
    encoder = chat_encoder(tiny_models["qwen2_5_vl"])
    text = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (text_record,) = validate_lines([json.dumps(text).encode()], clip_root, max_image_pixels=10**7).valid
    records = [video_record(clip_root, clip) for clip in sorted(CLIPS)] + [text_record]
    rows = [encode(encoder, record, clip_root) for record in records]
    batch = SFTCollator(encoder.processor, get_architecture("qwen2_5_vl"), clip_root)(rows)
    laid_out = batch["video_grid_thw"].prod(dim=1).tolist()
    assert [sample["patches"] for row in rows for sample in json.loads(row["video_samples"] or "[]")] == laid_out

    columns = ("length", "image_paths", "video_samples")
    data = training_data(Dataset.from_dict({key: [row[key] for row in rows] for key in columns}))
    assert data["video_patches_per_row"] == sum(laid_out) / len(rows)
    assert data["vision_records"] == len(CLIPS)  # video rows are batched apart from text rows, as image rows are

    def plan(**data) -> dict:
        sft = SFTParams(accelerate_config=accelerate_file(tmp_path, 1), per_device_train_batch_size=2)
        method = MethodParams(learning_rate=1e-5)  # full fine-tuning: the vision tower trains, its activations kept
        model = MODEL_CONFIGS / "qwen2.5-vl-7b-instruct"
        return build_plan(model_dir=model, sft=sft, method=method, images={}, max_length=4096, **data)

    with_videos = plan(**data)
    assert with_videos["settings"]["video_patches_per_row"] == data["video_patches_per_row"]
    # Three video rows and a text row in batches of 2: two vision batches and one text batch.
    assert with_videos["steps"]["batches_per_epoch"] == 3
    per_image = qwen2_5_vl.vision_tokens_per_image({})
    as_images = plan(**{**data, "video_patches_per_row": 0.0, "images_per_row": sum(laid_out) / len(rows) / per_image})
    without = plan(**{**data, "video_patches_per_row": 0.0})
    activations = [run["memory_gib"]["activations"] for run in (with_videos, as_images, without)]
    assert activations[0] == pytest.approx(activations[1], rel=1e-6) and activations[0] > activations[2]
