"""Time for `dvc repro` and for `kedro run` when nothing changed.

    .venv/bin/python bench/noop.py [--repeats 3]

Copies the project to a temporary folder (git + dvc initialised, training shortened to 6 steps, its own MLflow
store), runs `dvc repro` once to build everything, then times `dvc repro` again (nothing to do: DVC compares
hashes) and `kedro run --pipelines lora` (Kedro has no cache: it reruns every node, but training finds its
finished checkpoint for the same run config and trains no step). Goal: `dvc repro` under 5 s. Results go in
bench/RESULTS.md.
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


def run(command: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
        first = run([str(BIN / "dvc"), "repro"], project, env)
        print(f"first dvc repro (everything): {first:.1f} s")
        dvc = [run([str(BIN / "dvc"), "repro"], project, env) for _ in range(args.repeats)]
        kedro = [run([str(BIN / "kedro"), "run", "--pipelines", "lora"], project, env) for _ in range(args.repeats)]
        print("| command, nothing changed | median s | runs s |\n|---|---|---|")
        print(f"| dvc repro | {statistics.median(dvc):.2f} | {', '.join(f'{t:.2f}' for t in dvc)} |")
        print(
            f"| kedro run --pipelines lora | {statistics.median(kedro):.1f} | {', '.join(f'{t:.1f}' for t in kedro)} |"
        )


if __name__ == "__main__":
    main()
