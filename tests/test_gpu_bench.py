"""bench/gpu.py on the CPU with tiny widths: every case builds, both sides train, the result has every field.

The GPU run (bench/RESULTS.md) is the same script; this keeps it from breaking when the code it drives changes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT

SIDE_FIELDS = {
    "timed_steps", "seconds_per_step", "tokens_per_s", "real_tokens_per_s", "trained_tokens_per_s", "pad_share",
    "counts", "model_tflop_per_s", "mfu_datasheet", "mfu_measured_matmul", "max_memory_allocated_gib", "wall_s",
    "losses", "train_loss", "steps",
}  # fmt: skip


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_case_on_both_sides(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke", "--out", str(out)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["cases"]) == {"a", "b", "c", "d"}
    assert data["ceilings"]["measured_matmul_flops"] > 0
    for name, case in data["cases"].items():
        assert "error" not in case, (name, case.get("error"))
        assert case["planned_peak_allocated_gib"] > 0
        assert case["ratio_real_tokens_per_s"] > 0 and case["ratio_tokens_per_s"] > 0
        for side in ("ours", "plain"):
            measured = case[side]
            assert set(measured) == SIDE_FIELDS, (name, side)
            assert [step["step"] for step in measured["steps"]] == [1, 2]  # two optimizer steps, one timed
            counts = measured["counts"]
            assert 0 < counts["trained_tokens"] < counts["real_tokens"] <= counts["tokens"]
            assert (counts["vision_patches"] > 0) == (name != "c"), (name, side)
            assert measured["model_tflop_per_s"] > 0 and 0 <= measured["pad_share"] < 1
            assert math.isfinite(measured["train_loss"]) and measured["train_loss"] > 0, (name, side)
    padding_free = data["cases"]["c"]["ours"]["counts"]
    assert padding_free["tokens"] == padding_free["real_tokens"]  # our padding-free batches hold no pad token
    table = result.stdout
    assert "| a Qwen2.5-VL-7B" in table and "**ours / plain**" in table
