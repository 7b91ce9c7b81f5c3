"""Time for `dvc repro` and for `kedro run` when nothing changed.

    .venv/bin/python bench/noop.py [--repeats 3] [--target STAGE] [--kedro-tags TAGS]
    .venv/bin/python bench/noop.py --smoke   # --repeats 1 --target parameters --kedro-tags data_validation

Copies the project to a temporary folder (git + dvc initialised, training shortened to 6 steps, its own MLflow
store), runs `dvc repro` once to build everything, then times `dvc repro` again (nothing to do: DVC compares
hashes) and `kedro run --pipelines lora` (Kedro has no cache: it reruns every node, but training finds its
finished checkpoint for the same run config and trains no step). Goal: `dvc repro` under 5 s. Results go in
bench/RESULTS.md.

``--target`` limits every `dvc repro` to one stage and what it depends on, ``--kedro-tags`` the `kedro run` to
those nodes; ``--smoke`` (tests/test_bench.py) runs the same code on the cheapest stage and nodes (DVC's
parameters stage, Kedro's data validation: no preprocessing, no training), once. Kedro checks that the base model
exists, and a target that does not build it gets one first: ``--model``'s copy (default: the one `make model`
built), else `vlm-pipeline tiny-model` run as the tiny_model stage runs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_MODEL = "data/00_base_models/tiny-qwen2_5_vl"  # dvc.yaml's tiny_model stage output, params.yaml's base_model


def run(command: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", help="a dvc.yaml stage: repro only it and its upstream (default: everything)")
    parser.add_argument("--kedro-tags", help="kedro run --tags (default: the whole lora pipeline)")
    parser.add_argument("--model", type=Path, default=ROOT / TINY_MODEL, help="tiny model copied in for --target")
    parser.add_argument("--smoke", action="store_true", help="data validation only, once: checks the code runs")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.target, args.kedro_tags = 1, "parameters", "data_validation"
    repro = [str(BIN / "dvc"), "repro", *([args.target] if args.target else [])]
    kedro_run = [str(BIN / "kedro"), "run", "--pipelines", "lora"]
    kedro_run += ["--tags", args.kedro_tags] if args.kedro_tags else []
    dvc_label, kedro_label = " ".join(["dvc", *repro[1:]]), " ".join(["kedro", *kedro_run[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        # params.yaml: dvc.yaml's ${env}, ${base_model}, ${raw_data}; .dvcignore: what DVC does not walk.
        for name in ("pyproject.toml", ".telemetry", "dvc.yaml", "params.yaml", ".dvcignore", "README.md"):
            shutil.copy2(ROOT / name, project / name)
        for name in ("conf", "data/01_raw", "src"):
            shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        (project / ".venv").symlink_to(BIN.parent)
        params = project / "conf/base/parameters_training.yml"
        params.write_text(params.read_text().replace("max_steps: -1", "max_steps: 6"))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1"}
        run(["git", "init", "-q"], project, env)
        run([str(BIN / "dvc"), "init", "-q"], project, env)
        shutil.copy2(ROOT / ".dvc/config", project / ".dvc/config")  # the committed config: a linked cache
        if args.target and args.target != "tiny_model":
            if (args.model / "config.json").is_file():
                shutil.copytree(args.model, project / TINY_MODEL)
            else:
                tiny = [str(BIN / "vlm-pipeline"), "tiny-model", "--arch", "qwen2_5_vl", "--out", TINY_MODEL]
                run([*tiny, "--seed", "0"], project, env)
        first = run(repro, project, env)
        print(f"first {dvc_label} ({args.target or 'everything'}): {first:.1f} s")
        dvc = [run(repro, project, env) for _ in range(args.repeats)]
        kedro = [run(kedro_run, project, env) for _ in range(args.repeats)]
        print("| command, nothing changed | median s | runs s |\n|---|---|---|")
        print(f"| {dvc_label} | {statistics.median(dvc):.2f} | {', '.join(f'{t:.2f}' for t in dvc)} |")
        print(f"| {kedro_label} | {statistics.median(kedro):.1f} | {', '.join(f'{t:.1f}' for t in kedro)} |")


if __name__ == "__main__":
    main()
