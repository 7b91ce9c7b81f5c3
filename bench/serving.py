"""The served model (`transformers serve`) against the evaluation's own generation loop, on the same records.

    .venv/bin/python bench/serving.py [--model data/06_models/lora/merged] [--records 16] [--rounds 3]
    .venv/bin/python bench/serving.py --smoke --model DIR   # 4 records, 1 round (tests/test_bench.py)

Both sides answer the demo's test prompts (data/01_raw/shapes_vqa/test.jsonl, validated as the pipeline does)
greedily with the evaluation's `max_new_tokens`:
- **evaluation loop:** `scoring.generate_answers`, the evaluation stage's batched `model.generate` (batch size as
  `evaluation.batch_size`), model loaded in this process;
- **served, one client:** one request at a time through the `openai` client, images as data URLs; its median
  latency is what one user waits;
- **served, 4 clients:** four threads sending requests at once; records/s is the server's throughput.
The server's start-up (to `/health`) and its first request (which loads the model) are timed apart and left out of
the rows. The table also gives the share of served answers equal to the evaluation loop's. Results go in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlm_pipeline.architectures import architecture_for_model, load_chat_encoder, load_model
from vlm_pipeline.config.schema import EvaluationParams, ModelParams, PreprocessingParams
from vlm_pipeline.data.validation import validate_lines
from vlm_pipeline.scoring import generate_answers
from vlm_pipeline.serving import ServedModel, served_answers

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data/01_raw/shapes_vqa"
CLIENTS = 4


def demo_records(count: int) -> list[dict]:
    lines = (DATA / "test.jsonl").read_bytes().splitlines()
    records = validate_lines(lines, DATA, max_image_pixels=10**8).valid
    return (records * (count // len(records) + 1))[:count]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "data/06_models/lora/merged")
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="4 records, 1 round: checks the code still runs")
    args = parser.parse_args()
    if args.smoke:
        args.records, args.rounds = 4, 1
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is missing: run `make run` first, or pass --model")
    evaluation, preprocessing, loading = EvaluationParams(), PreprocessingParams(), ModelParams()
    records = demo_records(args.records)
    encoder = load_chat_encoder(args.model, preprocessing)
    architecture = architecture_for_model(args.model)
    model = load_model(args.model, **loading.loading_kwargs()).eval()

    def evaluation_loop() -> list[str]:
        return generate_answers(
            model,
            encoder,
            architecture,
            records,
            DATA,
            max_new_tokens=evaluation.max_new_tokens,
            batch_size=evaluation.batch_size,
        )

    print(f"machine: {platform.machine()}, python {platform.python_version()}; model {args.model}")
    with tempfile.TemporaryDirectory() as folder, open(Path(folder) / "server.log", "w+") as log:
        started = time.perf_counter()
        with ServedModel(args.model, loading.loading_kwargs(), startup_timeout_s=300, log=log) as server:
            up = time.perf_counter() - started

            def ask(chunk: list[dict]) -> list[str]:
                return served_answers(
                    server.base_url,
                    str(args.model),
                    chunk,
                    DATA,
                    max_new_tokens=evaluation.max_new_tokens,
                    template_kwargs=encoder.render_kwargs,
                )

            _, first = timed(ask, records[:1])  # the server loads the model on its first request
            loop_times, one_times, many_times, latencies = [], [], [], []
            for _ in range(args.rounds):
                expected, seconds = timed(evaluation_loop)
                loop_times.append(seconds)
                one_client = []
                for record in records:
                    (answer,), seconds = timed(ask, [record])
                    latencies.append(seconds)
                    one_client.append(answer)
                one_times.append(sum(latencies[-len(records) :]))
                with ThreadPoolExecutor(CLIENTS) as pool:
                    _, seconds = timed(lambda: list(pool.map(lambda r: ask([r])[0], records)))
                many_times.append(seconds)
    agree = sum(a == b for a, b in zip(one_client, expected, strict=True)) / len(records)
    rows = [
        ("evaluation loop (batched generate)", statistics.median(loop_times), None),
        ("served, 1 client", statistics.median(one_times), statistics.median(latencies)),
        (f"served, {CLIENTS} clients", statistics.median(many_times), None),
    ]
    print(f"server start-up to /health: {up:.1f} s; first request (loads the model): {first:.2f} s")
    print(f"| side | records | seconds (median of {args.rounds}) | records/s | median latency s |")
    print("|---|---|---|---|---|")
    for name, seconds, latency in rows:
        cell = "—" if latency is None else f"{latency:.3f}"
        print(f"| {name} | {len(records)} | {seconds:.2f} | {len(records) / seconds:.1f} | {cell} |")
    print(f"served answers equal to the evaluation loop's: {agree:.0%}")
    print(f"ratio served (1 client) / evaluation loop, seconds: {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
