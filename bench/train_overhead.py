"""Our training stage against a plain TRL SFTTrainer script: same tiny Llama, data, steps, seed and settings.

    .venv/bin/python bench/train_overhead.py [--steps 60] [--rounds 2]
    .venv/bin/python bench/train_overhead.py --smoke [--model DIR]   # 2 steps, 1 round (tests/test_bench.py)

Ours is `kedro run --pipelines lora --env tiny_llama --tags training` (the preflight plan, the run config,
`accelerate launch`, checkpoints, the atomic hand-over and MLflow logging) with random order and padded batches,
as TRL's defaults; plain is a script that builds `SFTTrainer` on the same base model and the same records
(alpaca → messages, the same LoRA). Both run alternately in one session; the table gives seconds per optimizer
step from each trainer's own `train_runtime`, and the wall time of the whole command. Goal: ours ≤ 1.05× plain
per step. Results go in bench/RESULTS.md.

The plain side uses TRL's prompt-completion format: ``prompt`` is the conversation up to the last assistant turn,
``completion`` that turn, and TRL's default ``completion_only_loss`` (on for prompt-completion data) trains only
the completion tokens: the assistant's answer and its end-of-turn token, what our labels mark on these one-turn
records. Not ``assistant_only_loss``: the tiny Llama carries the real Llama-3.1 chat template, which has no
``{% generation %}`` markers, and TRL 1.13 refuses to patch it ("The chat template is not training-compatible").
Both sides pin the template's date (``date_string``, our preprocessing default), so the token counts match.

``--model`` copies a tiny Llama already built (seed 0) instead of building one. ``--smoke`` runs 2 steps, one
round, and runs the data stages in the same `kedro run` as training (one process fewer), so its "ours" wall time
includes them.
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
from vlm_pipeline.config.schema import PreprocessingParams
from vlm_pipeline.data.formats import message_text, normalise_record

model_dir, data, out, steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
template_kwargs = PreprocessingParams().template_kwargs  # the date our preprocessing pins


def prompt_completion(record):
    # TRL's conversational prompt-completion: the turns before the last assistant turn, and that turn.
    messages = [{"role": m["role"], "content": message_text(m)} for m in record["messages"]]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": messages[last:last + 1], "chat_template_kwargs": template_kwargs}


rows = [normalise_record(json.loads(line)) for line in data.read_text().splitlines()]
dataset = Dataset.from_list([prompt_completion(r) for r in rows])
# completion_only_loss left at TRL's default (None): on for prompt-completion data.
args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=0.002, seed=42,
                 lr_scheduler_type="cosine", warmup_steps=0.05, optim="adamw_torch", use_cpu=True, report_to="none",
                 save_strategy="no", logging_steps=steps, dataloader_num_workers=0, dataloader_pin_memory=False)
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", modules_to_save=["lm_head"],
                  task_type="CAUSAL_LM")
trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=dataset,
                     processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft)
assert trainer.completion_only_loss, "TRL did not take the data as prompt-completion"
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
    parser.add_argument("--model", type=Path, help="a tiny Llama already built (default: build one, seed 0)")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 1 round: checks the code still runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        for name in ("pyproject.toml", ".telemetry", "README.md"):
            shutil.copy2(ROOT / name, project / name)
        for name in ("conf", "data/01_raw", "src"):
            shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
        model = project / "data/00_base_models/tiny-llama"  # conf/tiny_llama's base_model
        if args.model:
            shutil.copytree(args.model, model)
        else:
            build = [str(BIN / "vlm-pipeline"), "tiny-model", "--arch", "llama", "--out", str(model), "--seed", "0"]
            timed(build, project, env)
        kedro = [str(BIN / "kedro"), "run", "--pipelines", "lora", "--env", "tiny_llama"]
        data_tags = "data_validation,preprocessing"
        if not args.smoke:
            timed([*kedro, "--tags", data_tags], project, env)
        script = Path(tmp) / "plain_trl.py"
        script.write_text(PLAIN_TRL)
        ours_step, plain_step, ours_wall, plain_wall = [], [], [], []
        for round_ in range(args.rounds):
            # A new seed each round: a new run config, so our stage trains instead of reusing a finished run.
            params = (
                f"sft.max_steps={args.steps},sft.padding_free=false,sft.train_sampling_strategy=random,"
                f"sft.logging_steps={args.steps},sft.save_steps={args.steps},sft.seed={42 + round_}"
            )
            tags = f"{data_tags},training" if args.smoke and round_ == 0 else "training"
            wall, _ = timed([*kedro, "--tags", tags, "--params", params], project, env)
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
            f"{args.rounds} alternating rounds; plain TRL: prompt-completion records, completion-only loss"
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
