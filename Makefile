# Two commands on a fresh machine: `make run` (demo end to end) and `make test` (the test suite).
# torch is installed first at an exact pin that lies on this disk: a bare `torch` would pull a newer
# multi-GB build. torch 2.14.1 + torchvision 0.29.1 is the stack GPU users have, and Qwen2.5-VL's
# processor needs torchvision (the CPU-only torch 2.13.0 has no matching torchvision).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# DeepSpeed's sdist imports torch while building: built against the venv's torch (no build isolation), else the
# build environment would fetch another multi-GB torch. Same pin as pyproject.toml.
DEEPSPEED_PIN := deepspeed==0.19.8
TINY_MODEL := data/00_base_models/tiny-qwen2_5_vl
export DVC_NO_ANALYTICS := 1
# DeepSpeed on a CPU compiles its shared-memory collective op (deepspeed_shm_comm) when a process first starts its
# comm backend, used or not: about a minute of C++ on two cores. `make install` builds it once, into the venv (a
# cache of torch's, keyed by the venv's path, so clones side by side do not rebuild each other's), and the CPU
# ZeRO-3 runs after it load it.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: install model run lint test test-fast viz viz-screenshot notebook clean gpu-bench-prepare

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet --no-build-isolation $(DEEPSPEED_PIN)
	$(BIN)/pip install --quiet -e '.[test,notebook]'
	touch $@

# None on a GPU host: CUDA's comm backend has no such op.
$(BIN)/.deepspeed_ops: $(BIN)/.installed
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
	builder = get_accelerator().create_op_builder('ShareMemCommBuilder'); builder is None or builder.load()"
	touch $@

install: $(BIN)/.installed $(BIN)/.deepspeed_ops

$(TINY_MODEL)/config.json: $(BIN)/.installed
	$(BIN)/vlm-pipeline tiny-model --arch qwen2_5_vl --out $(TINY_MODEL) --seed 0

model: $(TINY_MODEL)/config.json

# The demo end to end on the tiny model, then the base-vs-tuned table.
# Through DVC (the tiny model, then every stage of both variants), so `dvc status` is clean after it and the
# metrics and plots it writes are what `dvc exp show` and `dvc metrics diff` compare against.
run: install
	$(BIN)/dvc repro
	$(BIN)/vlm-pipeline metrics data/08_reporting/lora/metrics.json

# ruff (configured in pyproject.toml): lint, and the formatting check. `ruff format .` fixes the latter.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The full suite in one pytest-xdist worker per core (TEST_WORKERS), handed tests one at a time, slowest first
# (tests/conftest.py orders them); the tests that share the accelerate files' fixed ports run one after another in
# one worker (--dist loadgroup, the xdist_group marker). Running those alone after the rest took as long in all:
# docs/testing.md.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The inner loop: everything but Kedro sessions, subprocesses and training runs (the `slow` marker).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Kedro-Viz as a static site in build/: the five stages are modular pipelines, collapsed by default (data_validation,
# preprocessing, and the variant holding training, adapter, evaluation). Serve it to open it:
# `.venv/bin/python -m http.server -d build`, then http://localhost:8000.
viz: install
	$(BIN)/kedro viz build

# docs/kedro_viz.png: the site's default view in headless Chromium (`apt-get install chromium`) as a first visit
# sees it, less Kedro-Viz's feature tour (dismissed through its own setting, stored before the site opens). The
# window is wide and short enough that Kedro-Viz's zoom-to-fit keeps every node in view.
VIZ_PORT ?= 8765
viz-screenshot: viz
	echo '<script>localStorage.setItem("KedroViz", JSON.stringify({showFeatureHints: false})); location.replace("/")</script>' > build/tour_off.html
	$(BIN)/python -m http.server $(VIZ_PORT) --bind 127.0.0.1 -d build >/dev/null 2>&1 & server=$$!; profile=$$(mktemp -d); sleep 1; \
	chromium --headless --no-sandbox --hide-scrollbars --user-data-dir=$$profile --window-size=2560,1000 \
	  --virtual-time-budget=20000 --screenshot=$(CURDIR)/docs/kedro_viz.png http://127.0.0.1:$(VIZ_PORT)/tour_off.html; \
	status=$$?; kill $$server; rm -rf $$profile; exit $$status

# Every notebook in notebooks/, executed headless against the last run's outputs (`make run` first), each kernel
# started in notebooks/ as Jupyter starts it; the executed copies (with their outputs) go to build/notebooks/, so
# the committed notebooks stay without outputs. Fails on the first cell that raises.
notebook: install
	@test -f data/07_model_output/lora/predictions.jsonl || { echo "no outputs of a run to explore: run 'make run' first"; exit 1; }
	$(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=600 --output-dir build/notebooks notebooks/*.ipynb

# What bench/gpu.py's GPU run carries (bench/gpu_device.sh runs it there): the prepared work folder, packed, and
# wheels of the venv's own versions of the packages the GPU machine lacks, for its Python 3.12.
GPU_WHEELS := trl datasets pydantic pydantic.core annotated.types typing.inspection dill multiprocess
gpu-bench-prepare: install
	$(BIN)/python bench/gpu.py prepare --work bench/gpu_work
	tar -cJf bench/gpu_work.tar.xz -C bench gpu_work
	rm -rf .whl && $(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  $$($(BIN)/python -m pip list --format=freeze | grep -iE '^($(shell echo $(GPU_WHEELS) | tr ' ' '|'))==')

clean:
	rm -rf data/00_base_models data/02_intermediate data/03_primary data/06_models data/07_model_output data/08_reporting mlflow.db
