"""Share of pad tokens: our batching against TRL's default (random order, pad to the longest row in a batch).

    .venv/bin/python bench/padding.py [--records 512] [--batch-size 8]
    .venv/bin/python bench/padding.py --smoke   # the same code on 32 records per set (tests/test_bench.py)

Mixed-length sets are made from the shipped data: text from data/01_raw/alpaca_glossary with answers repeated
1-6 times, vision from data/01_raw/shapes_vqa with 0-60 extra prompt words; each is encoded with the real tiny
processor (built here, seed 0). Text: our padding-free collator (what conf/llama_text_lora and tiny_llama use)
against TRL's DataCollatorForLanguageModeling, both run on the same random batches. Vision: the sampler our
trainer uses with train_sampling_strategy group_by_length (transformers' LengthGroupedSampler, conf/base's
default) against a random sampler, both padded to the longest row by our collator's rule. Goal: under 10% for
text, at least halved for VLM. Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from vlm_pipeline.architectures import get_architecture, load_chat_encoder
from vlm_pipeline.config.schema import PreprocessingParams
from vlm_pipeline.data.encoding import encode_record
from vlm_pipeline.data.formats import normalise_record
from vlm_pipeline.training.collator import SFTCollator

ROOT = Path(__file__).resolve().parents[1]


def mixed_records(kind: str, count: int, rng: random.Random) -> list[dict]:
    raw = ROOT / ("data/01_raw/alpaca_glossary" if kind == "text" else "data/01_raw/shapes_vqa")
    lines = (raw / "train.jsonl").read_text(encoding="utf-8").splitlines()
    records = []
    for i in range(count):
        record = json.loads(lines[i % len(lines)])
        if kind == "text":
            record["output"] = " ".join([record["output"]] * rng.randint(1, 6))
        else:
            record["messages"][0]["content"][1]["text"] += " please" * rng.randint(0, 60)
        records.append({**normalise_record(record), "source_line": i + 1})
    return records


def encode(kind: str, records: list[dict], model_dir: Path) -> list[dict]:
    encoder = load_chat_encoder(model_dir, PreprocessingParams())
    raw = ROOT / ("data/01_raw/alpaca_glossary" if kind == "text" else "data/01_raw/shapes_vqa")
    return [
        encode_record(
            encoder, record, raw, max_length=100_000, train_on="all_assistant_turns", truncate_text_only=False
        )
        for record in records
    ]


def pad_share_of_longest(batches: list[list[int]], lengths: list[int]) -> float:
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1 - sum(lengths[i] for batch in batches for i in batch) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="32 records per set: checks the code still runs")
    args = parser.parse_args()
    if args.smoke:
        args.records = 32
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        llama = get_architecture("llama").build_tiny(Path(tmp) / "llama", 0)
        qwen = get_architecture("qwen2_5_vl").build_tiny(Path(tmp) / "qwen", 0)
        text = encode("text", mixed_records("text", args.records, rng), llama)
        vision = encode("vision", mixed_records("vision", args.records, rng), qwen)

    generator = torch.Generator().manual_seed(0)
    batches = list(BatchSampler(RandomSampler(range(len(text)), generator=generator), args.batch_size, False))
    pad_id = 0
    trl = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    trl_pad = trl_total = ours_pad = ours_total = 0
    ours = SFTCollator(processor=None, architecture=get_architecture("llama"), image_root=ROOT, padding_free=True)
    for batch in batches:
        rows = [{"input_ids": text[i]["input_ids"], "labels": text[i]["labels"]} for i in batch]
        collated = trl([{"input_ids": row["input_ids"]} for row in rows])
        trl_pad += int((collated["attention_mask"] == 0).sum())
        trl_total += collated["attention_mask"].numel()
        flat = ours(rows)
        ours_total += flat["input_ids"].numel()
        ours_pad += flat["input_ids"].numel() - sum(len(row["input_ids"]) for row in rows)
    lengths = [row["length"] for row in vision]
    random_batches = list(
        BatchSampler(
            RandomSampler(range(len(lengths)), generator=torch.Generator().manual_seed(0)), args.batch_size, False
        )
    )
    grouped = list(
        BatchSampler(
            LengthGroupedSampler(args.batch_size, lengths=lengths, generator=torch.Generator().manual_seed(0)),
            args.batch_size,
            False,
        )
    )
    text_lengths = [len(row["input_ids"]) for row in text]
    print(
        f"# {args.records} records per set, batch {args.batch_size}; text lengths {min(text_lengths)}-"
        f"{max(text_lengths)} tokens, vision {min(lengths)}-{max(lengths)}"
    )
    print("| set | TRL default: pad share | ours: pad share | ratio ours / TRL |\n|---|---|---|---|")
    trl_share, ours_share = trl_pad / trl_total, ours_pad / ours_total
    print(f"| text (padding-free) | {trl_share:.1%} | {ours_share:.1%} | {ours_share / trl_share:.2f} |")
    random_share, grouped_share = pad_share_of_longest(random_batches, lengths), pad_share_of_longest(grouped, lengths)
    print(
        f"| vision (group_by_length) | {random_share:.1%} | {grouped_share:.1%} | {grouped_share / random_share:.2f} |"
    )


if __name__ == "__main__":
    main()
