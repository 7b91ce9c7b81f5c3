"""Peak memory and speed of `vlm-pipeline import` on Parquet files of different sizes: streaming means flat memory.

    .venv/bin/python bench/import_memory.py [--sizes 2000 20000] [--distinct 200] [--side 64]
    .venv/bin/python bench/import_memory.py --smoke   # 20 and 200 rows, 10 distinct 16x16 PNGs (tests/test_bench.py)

For each size it writes one Parquet file in HuggingFaceH4/llava-instruct-mix-vsft's layout (``messages`` + an
``images`` list of ``{bytes, path}`` structs) to a temporary folder: rows cycle through ``--distinct`` random-noise
PNGs of ``--side`` pixels (noise does not compress, so the file holds every row's bytes), in row groups of 100 rows
as the Hub's Parquet files of image datasets, without dictionary encoding (one image per row in real data). Then
it runs the import in a fresh subprocess, through a small wrapper process whose only child it is, and reads that
child's peak resident memory with ``getrusage(RUSAGE_CHILDREN)``. Goal: peak RSS at 20k rows ≤ 1.3 × at 2k.
Linux only (ru_maxrss in KiB). Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# HuggingFaceH4/llava-instruct-mix-vsft's schema (as tests/test_import.py).
PART = pa.struct([("index", pa.int64()), ("text", pa.string()), ("type", pa.string())])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(PART))])
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
LLAVA = pa.schema([("messages", pa.list_(MESSAGE)), ("images", pa.list_(IMAGE))])
ROW_GROUP = 100
# Runs its arguments as one child and prints that child's peak RSS (KiB) and wall time as JSON.
WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - start
if done.returncode:
    sys.exit(done.stderr[-3000:])
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "wall_s": wall}))
"""


def noise_png(rng: random.Random, side: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def write_llava_parquet(path: Path, rows: int, images: list[bytes]) -> None:
    """``rows`` llava rows, row ``i`` showing image ``i % len(images)``, written one row group at a time."""
    with pq.ParquetWriter(path, LLAVA, use_dictionary=False) as writer:
        for first in range(0, rows, ROW_GROUP):
            group = []
            for i in range(first, min(first + ROW_GROUP, rows)):
                user = [{"index": 0, "text": None, "type": "image"}, {"index": None, "text": f"Q{i}?", "type": "text"}]
                answer = [{"index": None, "text": f"answer {i}", "type": "text"}]
                group.append(
                    {
                        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                        "images": [{"bytes": images[i % len(images)], "path": None}],
                    }
                )
            writer.write_table(pa.Table.from_pylist(group, schema=LLAVA))


def measure(source: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "vlm_pipeline", "import", str(source), str(out)]
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"import of {source} failed:\n{done.stderr}")
    result = json.loads(done.stdout)
    report = json.loads((out / "import_report.json").read_text())["splits"]["train"]
    return {**result, **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--distinct", type=int, default=200, help="distinct images shared by the rows")
    parser.add_argument("--side", type=int, default=64, help="image width and height in pixels")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code still runs")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.distinct, args.side = [20, 200], 10, 16
    rng = random.Random(0)
    images = [noise_png(rng, args.side) for _ in range(args.distinct)]
    print(
        f"machine: {platform.machine()}, Python {platform.python_version()}, pyarrow {pa.__version__}; "
        f"{args.distinct} distinct {args.side}x{args.side} PNGs ({sum(map(len, images)) / len(images) / 1024:.1f} KiB "
        f"each), row groups of {ROW_GROUP} rows"
    )
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.sizes:
            source = Path(tmp) / f"llava-{rows}.parquet"
            start = time.perf_counter()
            write_llava_parquet(source, rows, images)
            written = time.perf_counter() - start
            result = measure(source, Path(tmp) / f"out-{rows}")
            assert result["rows"] == rows and result["distinct_images"] == min(rows, args.distinct), result
            peaks[rows] = result["maxrss_kib"] / 1024
            print(
                f"{rows:>7,} rows: parquet {source.stat().st_size / 2**20:7.1f} MiB (written in {written:.1f} s) | "
                f"peak RSS {peaks[rows]:7.1f} MiB | import {result['seconds']:.2f} s "
                f"({rows / result['seconds']:,.0f} rows/s), process wall {result['wall_s']:.2f} s"
            )
    if len(args.sizes) >= 2:
        small, large = min(args.sizes), max(args.sizes)
        ratio = peaks[large] / peaks[small]
        verdict = "met" if ratio <= 1.3 else "NOT met"
        print(f"peak RSS ratio {large:,}/{small:,} rows: {ratio:.3f} (goal ≤ 1.3: {verdict})")


if __name__ == "__main__":
    main()
