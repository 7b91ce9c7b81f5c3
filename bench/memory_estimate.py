"""The memory estimate against measured peak memory, for full FT, LoRA, checkpointing and optimizers.

    .venv/bin/python bench/memory_estimate.py [--steps 3]                  # CPU: peak resident memory
    python3 bench/memory_estimate.py --device cuda --measured-out m.json   # on a GPU machine: measure only
    .venv/bin/python bench/memory_estimate.py --device cuda --measured m.json   # here: the table
    .venv/bin/python bench/memory_estimate.py --smoke   # CPU, a 2-layer 64-wide model, 32 tokens, 1 step

``--smoke`` (tests/test_bench.py) runs the same code on a toy config, but measures one case (LoRA, in its own
process as always) and no machinery baseline (bench/memory_dtype.py --smoke measures that one); the other cases
print their estimate beside "not run".

Each case trains a Llama built from a config (random weights) for a few steps with a plain transformers Trainer
in its own process, on fixed-length rows. On CPU: a ~50M model in float32, measured as the process's peak
resident memory (VmHWM, reset after imports through /proc/self/clear_refs) minus the resident memory before the
model was built, less what the training machinery alone costs. On CUDA: a ~1.2B model (Llama-3.2-1B's shape) in
float32 under bf16 autocast, as our trainer runs on GPU, measured as ``torch.cuda.max_memory_allocated``. The
estimate is ``vlm_pipeline.planning.memory`` on the same config.json and settings, without the CUDA context
term. Measuring imports only torch, transformers and PEFT, so a GPU machine without this project can run it.
Linux only. Results go in bench/RESULTS.md.
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
# Llama-3.2-1B's shape (1.24B parameters): big enough that the model's own terms dwarf allocator rounding.
CUDA_CONFIG = {
    **CONFIG,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}
BATCH, SEQ = 4, 512
CUDA_SEQ = 1024
# --smoke: a toy Llama (the same class and code path), 32-token rows.
SMOKE_CONFIG = {
    **CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1024,
}
SMOKE_SEQ = 32
SMOKE_CASES = ("LoRA r16 q/k/v/o, AdamW",)
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


def measure(case: dict, model_dir: Path, steps: int, device: str, seq: int) -> int:
    """Runs in a child process: bytes of peak memory attributable to training (rows of ``seq`` tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

    torch.manual_seed(0)
    cuda = device == "cuda"
    vocab, seq = (
        (256, 8) if case.get("tiny") else (json.loads((model_dir / "config.json").read_text())["vocab_size"], seq)
    )
    tokens = torch.randint(0, vocab, (64, seq)).tolist()
    rows = [{"input_ids": row, "labels": row} for row in tokens]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: imports and data are not training memory
        before = rss_kib("VmRSS") * 1024
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
    model = LlamaForCausalLM(config)  # float32 weights, as our trainer loads them
    if case.get("lora"):
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    args = TrainingArguments(
        output_dir=str(model_dir / "out"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        use_cpu=not cuda,
        bf16=cuda,  # autocast on GPU, as our trainer; none on CPU
        optim=case["optim"],
        gradient_checkpointing=case.get("gradient_checkpointing", False),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator).train()
    if cuda:
        return torch.cuda.max_memory_allocated() - before
    return rss_kib("VmHWM") * 1024 - before


def estimate(case: dict, model_dir: Path, device: str, seq: int) -> float:
    from vlm_pipeline.config.schema import MethodParams
    from vlm_pipeline.planning.memory import MemorySettings, estimate_memory
    from vlm_pipeline.planning.model_shape import read_model_shape

    lora = {"r": 16, "lora_alpha": 32, "target_modules": LORA_TARGETS} if case.get("lora") else None
    shape = read_model_shape(model_dir, MethodParams(learning_rate=1e-4, lora=lora))
    settings = MemorySettings(
        optimizer=case["optim"],
        batch_size=BATCH,
        seq_len=seq,
        device=device,
        bf16_compute=device == "cuda",
        gradient_checkpointing=case.get("gradient_checkpointing", False),
    )
    return estimate_memory(shape, settings)["peak_allocated"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--measured-out", type=Path, help="measure only and write the figures here (GPU machine)")
    parser.add_argument("--measured", type=Path, help="compare the estimate with figures measured elsewhere")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a toy model, one step, one case: checks the code runs")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if args.smoke:
        if cuda:
            parser.error("--smoke is the CPU path")
        args.steps, args.seq = 1, SMOKE_SEQ
    args.seq = args.seq or (CUDA_SEQ if cuda else SEQ)
    if args.child:
        case = BASELINE if args.child == "baseline" else CASES[args.child]
        print(json.dumps({"bytes": measure(case, Path(args.model_dir), args.steps, args.device, args.seq)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        config = SMOKE_CONFIG if args.smoke else CUDA_CONFIG if cuda else CONFIG
        (model_dir / "config.json").write_text(json.dumps(config))
        measured = json.loads(args.measured.read_text()) if args.measured else measure_all(model_dir, args)
        if args.measured_out:
            args.measured_out.write_text(json.dumps(measured, indent=2))
            return
        steps = "" if args.measured else f", {args.steps} steps"  # figures measured elsewhere do not record theirs
        print(f"# {measured['machine']}; batch {BATCH} × {args.seq} tokens{steps}")
        baseline = measured.get("baseline", 0)
        if cuda:  # max_memory_allocated holds no machinery: the CUDA context is not an allocation
            print("| case | estimate GiB | measured GiB (max_memory_allocated) | estimate / measured |")
            print("|---|---|---|---|")
        else:
            alone = f"{baseline / 2**30:.3f} GiB" if "baseline" in measured else "not measured (--smoke)"
            print(f"training machinery alone (a 16-wide 1-layer model): {alone}")
            print(
                "| case | estimate GiB | measured GiB | measured − machinery GiB | estimate / (measured − machinery) |"
            )
            print("|---|---|---|---|---|")
        for name, case in CASES.items():
            estimated = estimate(case, model_dir, args.device, args.seq)
            if name not in measured["cases"]:
                print(f"| {name} | {estimated / 2**30:.3f} | not run: {measured['skipped'].get(name, 'missing')} |")
                continue
            net = measured["cases"][name] - baseline
            figures = [estimated / 2**30, measured["cases"][name] / 2**30] + ([] if cuda else [net / 2**30])
            print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in figures) + f" | {estimated / net:.2f} |")


def measure_all(model_dir: Path, args: argparse.Namespace) -> dict:
    """Each case in its own process (a fresh peak); on CPU also the machinery baseline."""
    import importlib.util

    import torch
    import transformers

    machine = f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
    machine += f"transformers {transformers.__version__}"
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    measured = {"machine": machine, "cases": {}, "skipped": {}}
    if args.device == "cpu" and not args.smoke:  # the CUDA context, its counterpart, is not in max_memory_allocated
        measured["baseline"] = run_child("baseline", model_dir, args)
    for name, case in CASES.items():
        if "8bit" in case["optim"] and importlib.util.find_spec("bitsandbytes") is None:
            measured["skipped"][name] = "bitsandbytes is not installed"
            continue
        if args.smoke and name not in SMOKE_CASES:
            measured["skipped"][name] = "--smoke measures one case"
            continue
        measured["cases"][name] = run_child(name, model_dir, args)
        print(f"{name}: {measured['cases'][name] / 2**30:.3f} GiB", file=sys.stderr, flush=True)
    return measured


def run_child(name: str, model_dir: Path, args: argparse.Namespace) -> int:
    command = [sys.executable, __file__, "--child", name, "--model-dir", str(model_dir), "--steps", str(args.steps)]
    command += ["--device", args.device, "--seq", str(args.seq)]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"{name}: the measuring process failed\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])["bytes"]


if __name__ == "__main__":
    main()
