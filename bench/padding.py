"""Share of pad tokens: our batching against TRL's default (random order, pad to the longest row in a batch).

    .venv/bin/python bench/padding.py [--records 512] [--realistic-records 256] [--batch-size 8]
    .venv/bin/python bench/padding.py --smoke   # the same code on a few records, one timed batch (tests/test_bench.py)

Two tables. The first, on the shipped demo data: text from data/01_raw/alpaca_glossary with answers repeated 1-6
times, vision from data/01_raw/shapes_vqa with 0-60 extra prompt words; each is encoded with the real tiny
processor (built here, seed 0). Text: our padding-free collator (what conf/llama_text_lora and tiny_llama use)
against TRL's DataCollatorForLanguageModeling, both run on the same random batches. Vision: the sampler our
trainer uses with train_sampling_strategy group_by_length (transformers' LengthGroupedSampler, conf/base's
default) against a random sampler, both padded to the longest row by our collator's rule. Goal: under 10% for
text, at least halved for VLM.

The second, on a realistic length distribution: bench/gpu.py's records (images at 11 resolutions, 100-1,300
Qwen2.5-VL image tokens each; prompts of 8-60 words; answers of 5-400 tokens, log-uniform), a fifth of them made
2-3 exchanges long with the image in the first or a later turn, encoded by our preprocessing for the tiny
Qwen2.5-VL and the tiny Llama-3.2-Vision (Mllama: its images are cross-attended, so its lengths are text only;
its chat template refuses the records with their image after the first turn, which it leaves out, see ``encode``).
The same records go through each way of batching, side by side in one run: TRL's default (random batches of B
rows, padded); ours length-grouped, padded; ours with token budgets (``token_budget.micro_batches``, a budget of B
× the mean length, so as many tokens per step on average), padded; and, Qwen2.5-VL only, ours length-grouped and
packed into one row (``SFTCollator(padding_free=True)``). Each way reports its pad share, records per batch, its
largest batch in tokens with pad (what sets the memory peak) and CPU tokens/s: real (non-pad) tokens per second
of a forward+backward of the tiny twin in fp32, every batch of the epoch, after one warm-up batch, the ways'
batches interleaved. Goals: Qwen2.5-VL packed 0% pad, Mllama with token budgets under 5%.

Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from vlm_pipeline.architectures import get_architecture, load_chat_encoder, load_model
from vlm_pipeline.config.schema import PreprocessingParams
from vlm_pipeline.data.encoding import encode_record
from vlm_pipeline.data.formats import normalise_record
from vlm_pipeline.data.labels import ChatEncoder, ChatTemplateError
from vlm_pipeline.training.collator import SFTCollator
from vlm_pipeline.training.token_budget import micro_batches
from vlm_pipeline.training.trainer import turn_off_kv_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402  (bench/gpu.py: its generator of realistic records and Qwen's image bound)

ROOT = Path(__file__).resolve().parents[1]
MULTI_TURN_SHARE = 0.2  # records made 2-3 exchanges long
TWINS = (("qwen2_5_vl", "Qwen2.5-VL"), ("mllama", "Llama-3.2-Vision"))
# Qwen's documented bound (at most 1,280 image tokens an image), as bench/gpu.py's cases; Mllama: its own 4 tiles.
PREPROCESSING = {"qwen2_5_vl": PreprocessingParams(images=gpu.QWEN_BOUNDS), "mllama": PreprocessingParams()}


# ---------------------------------------------------------------- the shipped demo data


def raw_dir(kind: str) -> Path:
    return ROOT / ("data/01_raw/alpaca_glossary" if kind == "text" else "data/01_raw/shapes_vqa")


def mixed_records(kind: str, count: int, rng: random.Random) -> list[dict]:
    lines = (raw_dir(kind) / "train.jsonl").read_text(encoding="utf-8").splitlines()
    records = []
    for i in range(count):
        record = json.loads(lines[i % len(lines)])
        if kind == "text":
            record["output"] = " ".join([record["output"]] * rng.randint(1, 6))
        else:
            record["messages"][0]["content"][1]["text"] += " please" * rng.randint(0, 60)
        records.append({**normalise_record(record), "source_line": i + 1})
    return records


def encode(records: list[dict], encoder: ChatEncoder, image_root: Path, skip_refused: bool = False) -> list[dict]:
    """The records as our preprocessing stores them, every one kept (the ways compare the same records).

    ``skip_refused`` leaves out the records whose chat template is not prefix-preserving on them (preprocessing
    stops on these): Llama-3.2-Vision's leaves out its system block when the conversation has an image and no system
    message, so a record with its image after the first turn renders its first turns differently on their own
    (with the block) and in the whole conversation (without)."""
    rows = []
    for record in records:
        try:
            row = encode_record(
                encoder,
                record,
                image_root,
                max_length=100_000,
                train_on="all_assistant_turns",
                truncate_text_only=False,
            )
        except ChatTemplateError:
            if not skip_refused:
                raise
            continue
        if row["reason"]:
            raise RuntimeError(f"preprocessing set aside record {row['source_line']}: {row['detail']}")
        rows.append(row)
    return rows


def chat_encoder(model_dir: Path, preprocessing: PreprocessingParams | None = None) -> ChatEncoder:
    return load_chat_encoder(model_dir, preprocessing or PreprocessingParams())


def pad_share_of_longest(batches: list[list[int]], lengths: list[int]) -> float:
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1 - sum(lengths[i] for batch in batches for i in batch) / padded


def random_batches(count: int, batch_size: int) -> list[list[int]]:
    """TRL's default: a random order cut into batches of ``batch_size`` rows."""
    order = RandomSampler(range(count), generator=torch.Generator().manual_seed(0))
    return list(BatchSampler(order, batch_size, False))


def length_grouped_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Ours: transformers' LengthGroupedSampler (train_sampling_strategy group_by_length, conf/base's default)."""
    order = LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(0))
    return list(BatchSampler(order, batch_size, False))


def shapes_table(records: int, batch_size: int, tmp: Path) -> None:
    rng = random.Random(0)
    llama = get_architecture("llama").build_tiny(tmp / "llama", 0)
    qwen = get_architecture("qwen2_5_vl").build_tiny(tmp / "qwen", 0)
    text = encode(mixed_records("text", records, rng), chat_encoder(llama), raw_dir("text"))
    vision = encode(mixed_records("vision", records, rng), chat_encoder(qwen), raw_dir("vision"))

    pad_id = 0
    trl = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    trl_pad = trl_total = ours_pad = ours_total = 0
    ours = SFTCollator(processor=None, architecture=get_architecture("llama"), image_root=ROOT, padding_free=True)
    for batch in random_batches(len(text), batch_size):
        rows = [{"input_ids": text[i]["input_ids"], "labels": text[i]["labels"]} for i in batch]
        collated = trl([{"input_ids": row["input_ids"]} for row in rows])
        trl_pad += int((collated["attention_mask"] == 0).sum())
        trl_total += collated["attention_mask"].numel()
        flat = ours(rows)
        ours_total += flat["input_ids"].numel()
        ours_pad += flat["input_ids"].numel() - sum(len(row["input_ids"]) for row in rows)
    lengths = [row["length"] for row in vision]
    text_lengths = [len(row["input_ids"]) for row in text]
    print(
        f"# {records} records per set, batch {batch_size}; text lengths {min(text_lengths)}-"
        f"{max(text_lengths)} tokens, vision {min(lengths)}-{max(lengths)}"
    )
    print("| set | TRL default: pad share | ours: pad share | ratio ours / TRL |\n|---|---|---|---|")
    trl_share, ours_share = trl_pad / trl_total, ours_pad / ours_total
    print(f"| text (padding-free) | {trl_share:.1%} | {ours_share:.1%} | {ours_share / trl_share:.2f} |")
    random_share = pad_share_of_longest(random_batches(len(lengths), batch_size), lengths)
    grouped_share = pad_share_of_longest(length_grouped_batches(lengths, batch_size), lengths)
    print(
        f"| vision (group_by_length) | {random_share:.1%} | {grouped_share:.1%} | {grouped_share / random_share:.2f} |"
    )


# ---------------------------------------------------------------- a realistic distribution


def exchange(question: str, answer: str, image: bool) -> list[dict]:
    content = [{"type": "image"}] if image else []
    return [
        {"role": "user", "content": [*content, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def with_more_exchanges(record: dict, rng: random.Random, smoke: bool) -> dict:
    """The record made 2-3 exchanges long, its one image in the first user turn or a later one."""
    questions = [record["messages"][0]["content"][-1]["text"]]
    answers = [record["messages"][1]["content"][-1]["text"]]
    for _ in range(rng.randint(1, 2)):
        questions.append(gpu.words(rng, rng.randint(8, 16 if smoke else 60)).capitalize() + "?")
        answers.append(gpu.words(rng, gpu.answer_words(rng, smoke)).capitalize() + ".")
    image_turn = rng.randrange(len(questions))
    messages = [
        message
        for turn, (question, answer) in enumerate(zip(questions, answers, strict=True))
        for message in exchange(question, answer, turn == image_turn)
    ]
    return {**record, "messages": messages}


def realistic_records(data: Path, count: int, smoke: bool) -> list[dict]:
    """bench/gpu.py's vision records (its images written under ``data``), a fifth of them multi-turn."""
    gpu.write_records(data, count, 0, smoke)
    rng = random.Random(1)
    records = []
    for i, line in enumerate((data / "vision.jsonl").read_text(encoding="utf-8").splitlines()):
        record = json.loads(line)
        if rng.random() < MULTI_TURN_SHARE:
            record = with_more_exchanges(record, rng, smoke)
        records.append({**normalise_record(record), "source_line": i + 1})
    return records


def image_in_first_turn(chat: dict) -> bool:
    return any(part.get("type") == "image" for part in chat["messages"][0]["content"])


@dataclass(frozen=True)
class Way:
    """One way of batching the records: its batches (row indices) and whether the collator packs them."""

    name: str
    batches: list[list[int]]
    packed: bool = False


@dataclass
class Tally:
    """What one way's batches came to: tokens (real and collated, pad included), records, batches, seconds."""

    real: int = 0
    collated: int = 0
    largest: int = 0  # the most tokens one batch collated to, pad included: what sets the memory peak
    records: int = 0
    batches: int = 0
    timed_real: int = 0
    seconds: float = 0.0

    @property
    def pad_share(self) -> float:
        return 1 - self.real / self.collated

    @property
    def tokens_per_second(self) -> float:
        return self.timed_real / self.seconds


def token_budget(lengths: list[int], batch_size: int) -> int:
    """``batch_size`` × the mean length: as many tokens per step as TRL's batches on average. Never under the
    longest record, which would fit no micro-batch (only a handful of records, as in --smoke, can come to that)."""
    return max(round(batch_size * statistics.mean(lengths)), max(lengths))


def ways_of_batching(lengths: list[int], has_images: list[bool], batch_size: int, packs: bool) -> list[Way]:
    budget = token_budget(lengths, batch_size)
    ways = [
        Way("TRL default: random, padded", random_batches(len(lengths), batch_size)),
        Way("ours: length-grouped, padded", length_grouped_batches(lengths, batch_size)),
        Way("ours: token budget, padded", micro_batches(lengths, has_images, budget, packed=False)),
    ]
    if packs:  # packing uses the length-grouped batches: the same records per batch, one row each
        ways.append(Way("ours: length-grouped, packed", ways[1].batches, packed=True))
    return ways


def forward_backward_seconds(model: torch.nn.Module, batch: dict) -> float:
    started = time.perf_counter()
    model(**batch).loss.backward()
    seconds = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return seconds


def measure(model, collators: dict[bool, SFTCollator], ways: list[Way], rows: list[dict], timed: int) -> list[Tally]:
    """Each way's tally over every batch of the epoch; its first ``timed`` batches also run forward+backward.

    The ways take turns batch by batch, so that other work on the machine slows them alike."""
    for way in ways:  # warm-up: first-call allocations and kernel choices for each way's layout
        forward_backward_seconds(model, collators[way.packed]([rows[i] for i in way.batches[0]]))
    tallies = [Tally() for _ in ways]
    for step in itertools.zip_longest(*(way.batches for way in ways)):
        for way, tally, indices in zip(ways, tallies, step, strict=True):
            if indices is None:
                continue
            batch_rows = [rows[i] for i in indices]
            batch = collators[way.packed](batch_rows)
            real = sum(row["length"] for row in batch_rows)
            tally.real += real
            tally.collated += batch["input_ids"].numel()
            tally.largest = max(tally.largest, batch["input_ids"].numel())
            tally.records += len(indices)
            tally.batches += 1
            if tally.batches <= timed:
                tally.seconds += forward_backward_seconds(model, batch)
                tally.timed_real += real
    return tallies


@dataclass(frozen=True)
class TwinResult:
    """One tiny twin on the records: what preprocessing made of them, and each way's tally."""

    label: str
    refused: int  # records its chat template refuses (``encode``), left out of its ways
    lengths: list[int]
    image_tokens: list[int]  # per record: Qwen's expanded image tokens, Mllama's one <|image|> per image
    ways: list[Way]
    tallies: list[Tally]


def measure_twin(architecture_name: str, label: str, data: Path, records: list[dict], batch_size: int, timed: int):
    """Build the tiny twin (seed 0), encode the records with our preprocessing and measure each way of batching."""
    architecture = get_architecture(architecture_name)
    model_dir = architecture.build_tiny(data / architecture_name, 0)
    encoder = chat_encoder(model_dir, PREPROCESSING[architecture_name])
    processor = encoder.processor
    rows = encode(records, encoder, data, skip_refused=True)
    lengths = [row["length"] for row in rows]
    has_images = [bool(row["image_paths"]) for row in rows]
    ways = ways_of_batching(lengths, has_images, batch_size, packs=architecture.padding_free(None))
    # Only the layouts its ways use: a family that cannot pack refuses a packing collator.
    layouts = {way.packed for way in ways}
    collators = {packed: SFTCollator(processor, architecture, data, padding_free=packed) for packed in layouts}
    model = load_model(model_dir)
    turn_off_kv_cache(model)  # as the trainer does: with a KV cache, packed records would attend to each other
    model.train()
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    image_tokens = [row["input_ids"].count(image_id) for row in rows]
    tallies = measure(model, collators, ways, rows, timed)
    return TwinResult(label, len(records) - len(rows), lengths, image_tokens, ways, tallies)


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}" if baseline else "n/a"


def print_realistic_table(results: list[TwinResult]) -> None:
    print(
        "| model | batching | pad share | records per batch (mean) | largest batch, tokens with pad | CPU tokens/s "
        "| pad share ÷ TRL | tokens/s ÷ TRL |\n|---|---|---|---|---|---|---|---|"
    )
    for result in results:
        trl = result.tallies[0]
        for way, tally in zip(result.ways, result.tallies, strict=True):
            print(
                f"| {result.label} | {way.name} | {tally.pad_share:.1%} | {tally.records / tally.batches:.1f} | "
                f"{tally.largest:,} | {tally.tokens_per_second:,.0f} | {ratio(tally.pad_share, trl.pad_share)} | "
                f"{ratio(tally.tokens_per_second, trl.tokens_per_second)} |"
            )


def realistic_table(records: int, batch_size: int, smoke: bool, tmp: Path) -> None:
    data = tmp / "realistic"
    chats = realistic_records(data, records, smoke)
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)  # what the machine has
    timed = 1 if smoke else sys.maxsize
    results = [measure_twin(name, label, data, chats, batch_size, timed) for name, label in TWINS]
    multi_turn = sum(len(chat["messages"]) > 2 for chat in chats)
    image_later = sum(not image_in_first_turn(chat) for chat in chats)
    print(
        f"\n# realistic: {records} records ({multi_turn} of 2-3 exchanges, {image_later} with the image after the "
        f"first turn), batch {batch_size}; fp32 forward+backward on {threads} CPU threads, "
        f"{'the first batch' if smoke else 'every batch'} of each way timed"
    )
    for result in results:
        lengths = result.lengths
        print(
            f"# {result.label}: {len(lengths)} records ({result.refused} refused by its chat template), lengths "
            f"{min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), "
            f"image tokens a record {min(result.image_tokens)}-{max(result.image_tokens)}; token budget "
            f"{token_budget(lengths, batch_size)}"
        )
    print_realistic_table(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=512, help="records per set of the demo-data table")
    parser.add_argument("--realistic-records", type=int, default=256, help="records of the realistic table")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a few records, one timed batch: checks the code runs")
    args = parser.parse_args()
    if args.smoke:
        args.records, args.realistic_records = 32, 8
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shapes_table(args.records, args.batch_size, Path(tmp))
        realistic_table(args.realistic_records, args.batch_size, args.smoke, Path(tmp))
    print(f"\n# {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
