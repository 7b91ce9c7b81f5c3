#!/usr/bin/env bash
# bench/gpu.py's GPU run, on the lent machine, from the repository root. `make gpu-bench-prepare` (here) wrote what
# it needs: .whl/ (trl, datasets, pydantic and their missing dependencies, for the machine's Python 3.12) and
# bench/gpu_work.tar.xz (records, tokenised Arrow data, run configs, plans, model configs and tokenizers).
# Usage there: bash bench/gpu_device.sh OUT_DIR   (the result JSON, the run's log and every side's log go there)
set -uo pipefail
out=${1:?usage: bench/gpu_device.sh OUT_DIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
python3 -c "import tarfile; tarfile.open('bench/gpu_work.tar.xz').extractall('bench', filter='data')" || exit 1
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.max.sm --format=csv
python3 -c "import datasets, pyarrow, trl, vlm_pipeline.training.trainer; print('trl', trl.__version__, 'datasets',
datasets.__version__, 'pyarrow', pyarrow.__version__)" || exit 1
# 8 minutes of wall time at most, the machine's start (1-2 min) included: each side of a case gets 120 s, the whole
# run 380 s (a side that would start later is skipped and reported; what finished is kept).
timeout 420 python3 bench/gpu.py run --work bench/gpu_work --out "$out/gpu_h200.json" --timeout 120 --deadline 380 \
    2>&1 | grep -v 'it/s\]' | tee "$out/run.log" | tail -40
tar -czf "$out/logs.tar.gz" bench/gpu_work/*/*.log
