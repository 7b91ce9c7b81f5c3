"""Benchmarks that cannot drift: every script in bench/ runs its ``--smoke`` mode (tiny sizes, the same code) and
prints its table, so a change of an API it calls breaks the suite, not the next re-measurement."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT

BENCH = PROJECT_ROOT / "bench"

# script -> (the tiny model it takes with --model, if any; lines its output must hold: the table's header or key row)
SCRIPTS = {
    "data.py": ("qwen2_5_vl", ["validate text:", "validate images:", "ratio ours/bare ="]),
    "data_memory.py": ("qwen2_5_vl", ["image ", "records/s, peak RSS"]),
    "import_memory.py": (None, ["peak RSS ratio 200/20 rows:"]),
    "memory_dtype.py": (None, ["| base dtype | measured MiB |", "| bfloat16 |", "bf16 / fp32: estimate"]),
    "memory_estimate.py": (None, ["| case | estimate GiB |", "| LoRA r16 q/k/v/o, AdamW |"]),
    "memory_published.py": (None, ["| torchtune row (Llama 3.1 8B) |", "| QLoRA, 1x 4090 |"]),
    "noop.py": ("qwen2_5_vl", ["| command, nothing changed |", "| dvc repro parameters |", "| kedro run "]),
    "num_proc.py": ("qwen2_5_vl", ["| stage | records | processes |", "| preprocess image | 100 | 2 |"]),
    "padding.py": (
        None,
        [
            "| set | TRL default: pad share |",
            "| vision (group_by_length) |",
            "| Qwen2.5-VL | ours: length-grouped, packed | 0.0% |",
        ],
    ),
    "serving.py": ("qwen2_5_vl", ["| side | records |", "| served, 1 client | 4 |", "served answers equal"]),
    "train_overhead.py": ("llama", ["| measure | ours | plain TRL |", "| s per optimizer step"]),
    "collate.py": (None, ["| case | rows per batch | ours s/batch | TRL s/batch |", "| b Llama-3.2-11B-Vision"]),
}


# Scripts smoke-tested elsewhere, or not yet: each says where, so a new script cannot slip through unlisted.
ELSEWHERE = {
    "gpu.py": "tests/test_gpu_bench.py runs its --smoke",
}


def test_every_bench_script_has_a_smoke_test():
    assert sorted(path.name for path in BENCH.glob("*.py") if path.name not in ELSEWHERE) == sorted(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_smoke(script, request, tmp_path):
    model, expected = SCRIPTS[script]
    command = [sys.executable, str(BENCH / script), "--smoke"]
    if model:  # the session's tiny models (built once per worker), so the script builds none of its own
        command += ["--model", str(request.getfixturevalue("tiny_models")[model])]
    # A temporary folder of its own, never the checkout: the scripts copy what they need.
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{script} --smoke exited {done.returncode}:\n{done.stdout}\n{done.stderr[-4000:]}"
    for line in expected:
        assert line in done.stdout, f"{script} --smoke printed no {line!r}:\n{done.stdout}"
