"""The memory estimate against measured peak memory on CPU, for full FT, LoRA, checkpointing and optimizers.

    .venv/bin/python bench/memory_estimate.py [--steps 3]

Each case trains a ~50M-parameter Llama (built from a config, random weights) for a few steps with a plain
transformers Trainer in its own process, on fixed-length rows, and reads the process's peak resident memory
(VmHWM, reset after imports through /proc/self/clear_refs), minus the resident memory before the model was
built. The estimate is ``vlm_pipeline.planning.memory`` on the same config.json and settings, in float32 (no
autocast on CPU), without the CUDA context term. Linux only. Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
BATCH, SEQ = 4, 512
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CASES = {
    "full FT, AdamW": {"optim": "adamw_torch"},
    "full FT, AdamW, gradient checkpointing": {"optim": "adamw_torch", "gradient_checkpointing": True},
    "full FT, Adafactor": {"optim": "adafactor"},
    "full FT, 8-bit AdamW": {"optim": "adamw_8bit"},
    "LoRA r16 q/k/v/o, AdamW": {"optim": "adamw_torch", "lora": True},
}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


# The same Trainer on a model of a few thousand parameters and 8-token rows: what the process spends on
# training machinery rather than on the model (thread pools, oneDNN scratch, allocator caches).
BASELINE = {"optim": "adamw_torch", "tiny": True}


def measure(case: dict, model_dir: Path, steps: int) -> int:
    """Runs in a child process: bytes of peak resident memory attributable to training."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

    torch.manual_seed(0)
    vocab, seq = (256, 8) if case.get("tiny") else (CONFIG["vocab_size"], SEQ)
    tokens = torch.randint(0, vocab, (64, seq)).tolist()
    rows = Dataset.from_dict({"input_ids": tokens, "labels": tokens})
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: imports and data are not training memory
    before = rss_kib("VmRSS")
    config = AutoConfig.from_pretrained(model_dir)
    if case.get("tiny"):
        config.update(
            {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 8,
                "vocab_size": 256,
            }
        )
    model = LlamaForCausalLM(config)
    if case.get("lora"):
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    args = TrainingArguments(
        output_dir=str(model_dir / "out"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        use_cpu=True,
        optim=case["optim"],
        gradient_checkpointing=case.get("gradient_checkpointing", False),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator).train()
    return (rss_kib("VmHWM") - before) * 1024


def estimate(case: dict, model_dir: Path) -> float:
    from vlm_pipeline.config.schema import MethodParams
    from vlm_pipeline.planning.memory import MemorySettings, estimate_memory
    from vlm_pipeline.planning.model_shape import read_model_shape

    lora = {"r": 16, "lora_alpha": 32, "target_modules": LORA_TARGETS} if case.get("lora") else None
    shape = read_model_shape(model_dir, MethodParams(output_dir="unused", learning_rate=1e-4, lora=lora))
    settings = MemorySettings(
        optimizer=case["optim"],
        batch_size=BATCH,
        seq_len=SEQ,
        device="cpu",
        gradient_checkpointing=case.get("gradient_checkpointing", False),
    )
    return estimate_memory(shape, settings)["peak_allocated"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case = BASELINE if args.child == "baseline" else CASES[args.child]
        print(json.dumps({"bytes": measure(case, Path(args.model_dir), args.steps)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        (model_dir / "config.json").write_text(json.dumps(CONFIG))
        print(f"# {platform.machine()}, {platform.python_version()}; Llama 512×6, batch {BATCH} × {SEQ} tokens, fp32")
        baseline = run_child("baseline", model_dir, args.steps)
        print(f"training machinery alone (a {16}-wide 1-layer model): {baseline / 2**30:.3f} GiB")
        print("| case | estimate GiB | measured GiB | measured − machinery GiB | estimate / (measured − machinery) |")
        print("|---|---|---|---|---|")
        for name, case in CASES.items():
            measured = run_child(name, model_dir, args.steps)
            estimated = estimate(case, model_dir)
            net = measured - baseline
            print(
                f"| {name} | {estimated / 2**30:.3f} | {measured / 2**30:.3f} | {net / 2**30:.3f} "
                f"| {estimated / net:.2f} |",
                flush=True,
            )


def run_child(name: str, model_dir: Path, steps: int) -> int:
    command = [sys.executable, __file__, "--child", name, "--model-dir", str(model_dir), "--steps", str(steps)]
    child = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])["bytes"]


if __name__ == "__main__":
    main()
