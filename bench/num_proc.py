"""Validation and preprocessing at `preprocessing.num_proc` 1, 2, 4: rows/s and peak memory per process count.

    .venv/bin/python bench/num_proc.py [--text 200000] [--images 50000] [--procs 1,2,4]
    .venv/bin/python bench/num_proc.py --smoke   # 400 text, 100 image records; 1 and 2 processes (tests/test_bench.py)

Validation is `validate_lines`, in one process (it reads each file once, in order: line numbers and duplicates).
Preprocessing is our `tokenize_split` node with `num_proc` N on the tiny Qwen2.5-VL (`make model` builds it; with
--smoke and no model there, one is built in a temporary folder), on the text records and on the image records, each
image a file of its own. Memory is the peak proportional set size (PSS: a page shared by several processes is split
between them, so forked workers' shared pages count once) of this process and all its children, sampled every
0.2 s (the models, libraries and records this process already holds included). Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from datasets import disable_progress_bars

from data import image_lines, text_lines, tiny_model
from vlm_pipeline.config.run import RunContext
from vlm_pipeline.config.schema import ModelParams, PreprocessingParams
from vlm_pipeline.data.validation import validate_lines
from vlm_pipeline.pipelines.preprocessing.nodes import tokenize_split

ROOT = Path(__file__).resolve().parents[1]
MAX_IMAGE_PIXELS = 12_845_056


def tree_pss() -> int:
    """PSS of this process and every live descendant, in bytes."""
    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except psutil.Error:  # a worker that ended between the listing and the read
            pass
    return total


def measured(stage: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, int]:
    """The stage's result, the seconds it took and the peak PSS of this process and its workers (bytes)."""
    peak, done = [tree_pss()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_pss())
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = stage(*args, **kwargs)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return result, seconds, max(peak[0], tree_pss())


def row(stage: str, records: int, processes: int, seconds: float, memory: int) -> str:
    return f"| {stage} | {records} | {processes} | {seconds:.1f} | {records / seconds:,.0f} | {memory / 2**20:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=int, default=200_000, help="alpaca text records")
    parser.add_argument("--images", type=int, default=50_000, help="one-image records")
    parser.add_argument("--procs", default="1,2,4", help="the num_proc values, comma-separated")
    parser.add_argument("--model", type=Path, default=ROOT / "data/00_base_models/tiny-qwen2_5_vl")
    parser.add_argument("--smoke", action="store_true", help="400 text and 100 image records, 1 and 2 processes")
    args = parser.parse_args()
    if args.smoke:
        args.text, args.images, args.procs = 400, 100, "1,2"
    procs = [int(value) for value in args.procs.split(",")]
    disable_progress_bars()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args.model = tiny_model(args.model, args.smoke, root)
        sets = {"text": text_lines(args.text, random.Random(0)), "image": image_lines(args.images, root)}
        records = {}
        print("| stage | records | processes | seconds | rows/s | peak PSS, all processes, MiB |")
        print("|---|---|---|---|---|---|")
        for kind, lines in sets.items():
            result, seconds, memory = measured(validate_lines, lines, root, max_image_pixels=MAX_IMAGE_PIXELS)
            assert len(result.valid) == len(lines), result.quarantine[:2]
            records[kind] = result.valid
            print(row(f"validate {kind}", len(lines), 1, seconds, memory), flush=True)
        context = RunContext(base_model=args.model, image_root=root, model=ModelParams())
        for kind, valid in records.items():
            for count in procs:
                params = PreprocessingParams(max_length=512, num_proc=count)
                (kept, _, _), seconds, memory = measured(tokenize_split, valid, context, params)
                assert len(kept) == len(valid)
                print(row(f"preprocess {kind}", len(valid), count, seconds, memory), flush=True)


if __name__ == "__main__":
    main()
