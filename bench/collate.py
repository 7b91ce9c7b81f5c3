"""The data loader's share of a GPU step: seconds to build one batch, our collator against TRL's, on this CPU.

    .venv/bin/python bench/collate.py [--batches 10] [--smoke]

A training step cannot be faster than its batch is made. Our collator takes pre-tokenised Arrow rows and only loads
and processes the images; TRL's vision collator renders the chat template, tokenises and processes the images for
every batch. Both are timed on bench/gpu.py's cases (a: Qwen2.5-VL at 100-1,300 image tokens, b: Llama-3.2-Vision
with one 560-px tile) at the real processors' settings and the batch sizes of the GPU run, one process each (one
DataLoader worker, or the main process with `dataloader_num_workers: 0`): fetching the rows (for TRL: decoding the
images from the dataset) and collating. The ratio to a GPU step time says how many workers keep the GPU fed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402  (bench/gpu.py: the same cases, records and plain-TRL set-up)


def seconds_per_batch(make_batch, batches: int) -> list[float]:
    make_batch(0)  # warm-up: first-call imports and caches
    times = []
    for index in range(batches):
        started = time.perf_counter()
        make_batch(index)
        times.append(time.perf_counter() - started)
    return times


def rows(index: int, size: int, total: int) -> list[int]:
    """Batch ``index`` of ``size`` rows in file order, wrapping around."""
    return [(index * size + i) % total for i in range(size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny images, 2 batches")
    args = parser.parse_args()
    os.chdir(gpu.ROOT)  # the run configs name the accelerate file relative to the repository, as the trainer reads it
    from datasets import load_from_disk
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlm_pipeline.architectures import get_architecture, load_processor
    from vlm_pipeline.training.collator import SFTCollator

    batches = 2 if args.smoke else args.batches
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        gpu.prepare(work, smoke=args.smoke, device="cuda", cases=("a", "b"))
        manifest = json.loads((work / "manifest.json").read_text())
        print(f"# {batches} batches per side after one warm-up, one process; median (min-max) seconds per batch")
        print("| case | rows per batch | ours s/batch | TRL s/batch | ratio ours / TRL |\n|---|---|---|---|---|")
        for name, case in manifest["cases"].items():
            size = gpu.batch_size(gpu.Case(**{k: case[k] for k in gpu.Case.__dataclass_fields__}), args.smoke)
            config = json.loads((work / name / "run_config.json").read_text())
            train = load_from_disk(config["train_dataset"])
            ours = SFTCollator(
                load_processor(config["base_model"], image_bounds=config["image_bounds"]),
                get_architecture(case["architecture"]),
                Path(config["image_root"]),
            )
            spec = json.loads((work / name / "plain.json").read_text())
            dataset, processor, collator = gpu.plain_inputs(spec)
            trl = collator or DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)

            mine = seconds_per_batch(lambda i, c=ours, d=train, n=size: c([d[j] for j in rows(i, n, len(d))]), batches)
            theirs = seconds_per_batch(
                lambda i, c=trl, d=dataset, n=size: c([d[j] for j in rows(i, n, len(d))]), batches
            )
            ratio = statistics.median(mine) / statistics.median(theirs)
            print(
                f"| {name} {case['what']} | {size} | {statistics.median(mine):.3f} ({min(mine):.3f}-{max(mine):.3f}) "
                f"| {statistics.median(theirs):.3f} ({min(theirs):.3f}-{max(theirs):.3f}) | {ratio:.2f} |"
            )


if __name__ == "__main__":
    main()
