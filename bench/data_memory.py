"""Memory of the data stages against the size of the data: peak RSS and records/s of ``data_validation`` plus
``preprocessing`` (a real ``kedro run``) at two sizes, and the ratio of their peaks.

    .venv/bin/python bench/data_memory.py [--text 20000 200000] [--image 20000 100000] [--shared-images 500]
    .venv/bin/python bench/data_memory.py --smoke   # --text --image 10 --shared-images 2 (tests/test_bench.py)

Each size runs in a fresh process (``kedro run --pipeline lora --tags data_validation,preprocessing`` in a
throw-away copy of the project, one process, ``num_proc`` 1), so its peak RSS is its own: read with
``getrusage(RUSAGE_CHILDREN)`` by a fresh wrapper per run. Text records are alpaca lines, each different; image
records share ``--shared-images`` files, as VQA sets do. Only ``train.jsonl`` is written: the test split is held
out of it by hash, as with a user's single file. The goal (issue 14): the peak at 10x the records within 1.3x.
Needs the tiny Qwen2.5-VL (``make model``, or ``--model DIR``). ``--smoke`` runs the same code on one tiny image set
(one kedro run, no ratio); an empty ``--text`` or ``--image`` skips that set. Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data/00_base_models/tiny-qwen2_5_vl"
SHAPES_IMAGES = ROOT / "data/01_raw/shapes_vqa/images"
PROJECT_FILES = ("pyproject.toml", ".telemetry", "params.yaml")
# The wrapper: run the command, then print the largest RSS any of its processes reached (Linux: KiB).
PEAK = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def write_text_set(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    with (folder / "train.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(count):
            record = {"instruction": f"Define term number {i}.", "input": "", "output": f"Term {i} is a unit."}
            handle.write(json.dumps(record) + "\n")


def write_image_set(folder: Path, count: int, shared: int) -> None:
    (folder / "images").mkdir(parents=True)
    sources = sorted(SHAPES_IMAGES.glob("*.png"))
    for i in range(shared):
        shutil.copyfile(sources[i % len(sources)], folder / "images" / f"{i:05d}.png")
    with (folder / "train.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(count):
            record = {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Shape {i}?"}]},
                    {"role": "assistant", "content": "red"},
                ],
                "images": [f"images/{i % shared:05d}.png"],
            }
            handle.write(json.dumps(record) + "\n")


def measure(raw: Path, work: Path, model: Path) -> dict:
    """One data-stage run in a fresh project copy: seconds, peak RSS (MiB) and the records it read."""
    project = work / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, project / name)
    for folder in ("conf", "src"):  # kedro wants the source folder the project names
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    params = f"raw_data={raw},base_model={model},preprocessing.num_proc=1"
    kedro = [str(Path(sys.executable).parent / "kedro"), "run", "--pipeline", "lora"]
    command = [*kedro, "--tags", "data_validation,preprocessing", "--params", params]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *command], cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"kedro run failed on {raw}:\n{done.stderr[-3000:]}")
    report = json.loads((project / "data/02_intermediate/train/report.json").read_text())
    return {"seconds": seconds, "peak_mib": int(done.stdout.split()[-1]) / 1024, "records": report["total"]}


def compare(kind: str, sizes: list[int], writer, work: Path, model: Path) -> None:
    results = []  # no sizes: the set is skipped
    for size in sizes:
        folder = work / f"{kind}_{size}"
        writer(folder / "raw", size)
        result = measure(folder / "raw", folder, model)
        results.append(result)
        print(
            f"{kind} {size:>7,} records: {result['seconds']:7.1f} s, {result['records'] / result['seconds']:7.0f} "
            f"records/s, peak RSS {result['peak_mib']:7.1f} MiB",
            flush=True,
        )
        shutil.rmtree(folder)
    if len(results) < 2:
        return
    small, large = results[0], results[-1]
    print(
        f"{kind}: {sizes[-1] / sizes[0]:.0f}x the records -> peak RSS x{large['peak_mib'] / small['peak_mib']:.3f} "
        "(goal <= 1.3)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=int, nargs="*", default=[20_000, 200_000], metavar="N", help="SMALL LARGE")
    parser.add_argument("--image", type=int, nargs="*", default=[20_000, 100_000], metavar="N", help="SMALL LARGE")
    parser.add_argument("--shared-images", type=int, default=500)
    parser.add_argument("--model", type=Path, default=MODEL, help="the base model (default: the tiny Qwen2.5-VL)")
    parser.add_argument("--smoke", action="store_true", help="one tiny image set: checks the code still runs")
    args = parser.parse_args()
    if args.smoke:
        args.text, args.image, args.shared_images = [], [10], 2
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model} is missing: run `make model` first")
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="data-memory-") as tmp:
        work = Path(tmp)
        compare("text", args.text, write_text_set, work, args.model.resolve())
        image_set = partial(write_image_set, shared=args.shared_images)
        compare("image", args.image, image_set, work, args.model.resolve())


if __name__ == "__main__":
    main()
