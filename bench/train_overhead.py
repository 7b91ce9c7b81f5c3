"""Our training stage against a plain TRL SFTTrainer script: same tiny Llama, data, steps, seed and settings.

    .venv/bin/python bench/train_overhead.py [--steps 60] [--rounds 2]

Ours is `kedro run --pipelines lora --env tiny_llama --tags training` (the preflight plan, the run config,
`accelerate launch`, checkpoints, the atomic hand-over and MLflow logging) with random order and padded batches,
as TRL's defaults; plain is a script that builds `SFTTrainer` on the same base model and the same records
(alpaca → messages, assistant-only loss, the same LoRA). Both run alternately in one session; the table gives
seconds per optimizer step from each trainer's own `train_runtime`, and the wall time of the whole command.
Goal: ours ≤ 1.05× plain per step. Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
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

PLAIN_TRL = """
import json, sys
from pathlib import Path
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from vlm_pipeline.data.formats import message_text, normalise_record

model_dir, data, out, steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rows = [normalise_record(json.loads(line)) for line in data.read_text().splitlines()]
dataset = Dataset.from_list([{"messages": [{"role": m["role"], "content": message_text(m)} for m in r["messages"]]}
                             for r in rows])
args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=0.002, seed=42,
                 lr_scheduler_type="cosine", warmup_steps=0.05, optim="adamw_torch", use_cpu=True, report_to="none",
                 save_strategy="no", logging_steps=steps, assistant_only_loss=True, dataloader_num_workers=0,
                 dataloader_pin_memory=False)
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", modules_to_save=["lm_head"],
                  task_type="CAUSAL_LM")
trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=dataset,
                     processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft)
result = trainer.train()
print(json.dumps({"train_runtime": result.metrics["train_runtime"], "steps": trainer.state.global_step}))
"""


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        for name in ("pyproject.toml", ".telemetry", "README.md"):
            shutil.copy2(ROOT / name, project / name)
        for name in ("conf", "data/01_raw", "src"):
            shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
        model = project / "data/00_base_models/tiny-llama"
        timed(
            [str(BIN / "vlm-pipeline"), "tiny-model", "--arch", "llama", "--out", str(model), "--seed", "0"],
            project,
            env,
        )
        kedro = [str(BIN / "kedro"), "run", "--pipelines", "lora", "--env", "tiny_llama"]
        timed([*kedro, "--tags", "data_validation,preprocessing"], project, env)
        script = Path(tmp) / "plain_trl.py"
        script.write_text(PLAIN_TRL)
        ours_step, plain_step, ours_wall, plain_wall = [], [], [], []
        for round_ in range(args.rounds):
            # A new seed each round: a new run config, so our stage trains instead of reusing a finished run.
            params = (
                f"sft.max_steps={args.steps},sft.padding_free=false,sft.train_sampling_strategy=random,"
                f"sft.logging_steps={args.steps},sft.save_steps={args.steps},sft.seed={42 + round_}"
            )
            wall, _ = timed([*kedro, "--tags", "training", "--params", params], project, env)
            history = json.loads((project / "data/06_models/lora/training_history.json").read_text())
            ran = json.loads((project / "data/06_models/lora/trained/run_info.json").read_text())["global_step"]
            ours_step.append(history[-1]["train_runtime"] / ran)
            ours_wall.append(wall)
            wall, out = timed(
                [
                    sys.executable,
                    str(script),
                    str(model),
                    str(project / "data/01_raw/alpaca_glossary/train.jsonl"),
                    str(Path(tmp) / "plain"),
                    str(args.steps),
                ],
                project,
                env,
            )
            plain = json.loads(out.strip().splitlines()[-1])
            plain_step.append(plain["train_runtime"] / plain["steps"])
            plain_wall.append(wall)
        ours, plain = statistics.median(ours_step), statistics.median(plain_step)
        print(
            f"# tiny Llama, LoRA r16 all-linear + lm_head, batch 16, {args.steps} steps, "
            f"{args.rounds} alternating rounds"
        )
        print("| measure | ours | plain TRL | ratio ours / plain |\n|---|---|---|---|")
        print(
            f"| s per optimizer step (median of train_runtime / steps) | {ours:.3f} | {plain:.3f} "
            f"| {ours / plain:.3f} |"
        )
        ow, pw = statistics.median(ours_wall), statistics.median(plain_wall)
        print(f"| wall time of the whole command, s (median) | {ow:.1f} | {pw:.1f} | {ow / pw:.2f} |")


if __name__ == "__main__":
    main()
