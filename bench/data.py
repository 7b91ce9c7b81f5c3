"""Data-stage benchmark: validation throughput, and preprocessing overhead against a bare `datasets.map`.

    .venv/bin/python bench/data.py [--text-lines 100000] [--image-records 5000] [--preprocess-records 1000]
    .venv/bin/python bench/data.py --smoke   # the same code on 200 lines, 20 records, 1 round (tests/test_bench.py)

Prints rows/s for `validate_lines` on a generated text JSONL and image JSONL, then times our preprocessing
node (`tokenize_split`: encode, label masks, length policy, quarantine, report) against a `datasets.map`
that does only the processor call on the same records, in the same run, and prints the ratio, twice:
- on copies of the sample images, all one size, as a photo set of a few sizes is: the processor counts the image
  tokens of the first record and the others reuse the count (vlm_pipeline.data.labels);
- on images each of a size no other record has, the worst case: every record goes through the processor.
Needs the tiny Qwen2.5-VL (`make model`; with --smoke and no model there, one is built in a temporary folder).
Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from datasets import Dataset, disable_progress_bars
from PIL import Image

from vlm_pipeline.architectures import get_architecture, load_processor
from vlm_pipeline.config.run import RunContext
from vlm_pipeline.config.schema import ModelParams, PreprocessingParams
from vlm_pipeline.data.encoding import attach_images, load_images
from vlm_pipeline.data.validation import validate_lines
from vlm_pipeline.pipelines.preprocessing.nodes import tokenize_split

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "data/01_raw/shapes_vqa"
WORDS = "rebar formwork lintel joist truss footing slab beam column grout concrete steel timber".split()


def text_lines(count: int, rng: random.Random) -> list[bytes]:
    lines = []
    for i in range(count):
        term = " ".join(rng.choices(WORDS, k=3))
        record = {"instruction": f"Define the term ({i}).", "input": term, "output": f"A {term} used on site."}
        lines.append(json.dumps(record).encode())
    return lines


def image_lines(count: int, image_root: Path, *, distinct_sizes: bool = False) -> list[bytes]:
    """``count`` records, each with its own image file: copies of the sample images (all 56x56), or with
    ``distinct_sizes`` each resized to a size no other record has."""
    sources = sorted((SHAPES / "images").glob("*.png"))
    folder = "distinct" if distinct_sizes else "images"
    (image_root / folder).mkdir(parents=True)
    lines = []
    for i in range(count):
        name = f"{folder}/{i:06d}.png"
        if distinct_sizes:
            with Image.open(sources[i % len(sources)]) as image:
                image.resize((56 + i % 64, 56 + i // 64)).save(image_root / name)
        else:
            shutil.copyfile(sources[i % len(sources)], image_root / name)
        record = {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": f"What colour is shape {i}?"}],
                },
                {"role": "assistant", "content": "red"},
            ],
            "images": [name],
        }
        lines.append(json.dumps(record).encode())
    return lines


def tiny_model(model: Path, smoke: bool, scratch: Path) -> Path:
    """``model`` (the tiny Qwen2.5-VL `make model` builds); a smoke run without it builds one in ``scratch``."""
    if (model / "config.json").is_file():
        return model
    if not smoke:
        raise SystemExit(f"{model} is missing: run `make model` first")
    return get_architecture("qwen2_5_vl").build_tiny(scratch / "model", 0)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def bare_map(records: list[dict], model: Path, image_root: Path) -> Dataset:
    """The baseline: load the processor, then one processor call per record through datasets.map."""
    processor = load_processor(model)

    def call(row):
        record = json.loads(row["record"])
        encoded = processor.apply_chat_template(
            attach_images(record["messages"], load_images(record, image_root)), tokenize=True, return_dict=True
        )
        return {"input_ids": encoded["input_ids"][0]}

    raw = Dataset.from_list([{"record": json.dumps(r)} for r in records])
    return raw.map(call, remove_columns=["record"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-lines", type=int, default=100_000)
    parser.add_argument("--image-records", type=int, default=5_000)
    parser.add_argument("--preprocess-records", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", type=Path, default=ROOT / "data/00_base_models/tiny-qwen2_5_vl")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the code still runs")
    args = parser.parse_args()
    if args.smoke:
        args.text_lines, args.image_records, args.preprocess_records, args.rounds = 200, 20, 20, 1
    disable_progress_bars()
    rng = random.Random(0)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args.model = tiny_model(args.model, args.smoke, root)
        text = text_lines(args.text_lines, rng)
        result, seconds = timed(validate_lines, text, root, max_image_pixels=12_845_056)
        assert result.report["valid"] == args.text_lines
        print(f"validate text:   {args.text_lines} lines in {seconds:.2f} s = {args.text_lines / seconds:,.0f} rows/s")

        images = image_lines(args.image_records, root)
        result, seconds = timed(validate_lines, images, root, max_image_pixels=12_845_056)
        assert result.report["valid"] == args.image_records
        print(
            f"validate images: {args.image_records} records in {seconds:.2f} s = "
            f"{args.image_records / seconds:,.0f} rows/s"
        )

        distinct = validate_lines(
            image_lines(args.preprocess_records, root, distinct_sizes=True), root, max_image_pixels=12_845_056
        ).valid
        context = RunContext(base_model=args.model, image_root=root, model=ModelParams())
        bare_map(distinct[:20], args.model, root)  # warm-up: first-call costs land in neither side
        for label, records in (
            ("image records", result.valid[: args.preprocess_records]),
            ("image records, each image a size of its own", distinct),
        ):
            compare_preprocessing(label, records, context, args.rounds)


def compare_preprocessing(label: str, records: list[dict], context: RunContext, rounds: int) -> None:
    """Our preprocessing node against the bare map on the same records, alternated, medians of ``rounds``."""
    params = PreprocessingParams(max_length=512)
    # Alternate the two sides and take medians, so drift on a shared machine hits both alike.
    bare_times, our_times = [], []
    for _ in range(rounds):
        bare_times.append(timed(bare_map, records, context.base_model, context.image_root)[1])
        (kept, _, _), seconds = timed(tokenize_split, records, context, params)
        assert len(kept) == len(records)
        our_times.append(seconds)
    bare, ours = statistics.median(bare_times), statistics.median(our_times)
    print(
        f"preprocess {len(records)} {label} (median of {rounds}): bare datasets.map {bare:.2f} s, "
        f"ours {ours:.2f} s, ratio ours/bare = {ours / bare:.3f}"
    )


if __name__ == "__main__":
    main()
