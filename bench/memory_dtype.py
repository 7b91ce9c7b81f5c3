"""Peak memory of the same LoRA training run with the base loaded in float32 and in bfloat16, on CPU.

    .venv/bin/python bench/memory_dtype.py [--steps 3] [--vocab 16000]
    .venv/bin/python bench/memory_dtype.py --smoke   # memory_estimate's toy config, 32 tokens, 1 step

``--smoke`` (tests/test_bench.py) runs the same code on memory_estimate's smoke config, with the machinery
baseline and the bfloat16 run (the one with the dtype checks) each in its own process; float32 gets its
estimate only.

The method is bench/memory_estimate.py's, whose model, shapes and helpers it imports: a ~50M-parameter Llama
(random weights, saved once as bf16 safetensors like a real checkpoint) is loaded through the project's
``load_model`` in each dtype and trained with LoRA r16 on q/k/v/o for a few steps by a plain transformers
Trainer with AdamW, each dtype in its own process. The bf16 run uses ``bf16=True`` (autocast, as our trainer
on GPU) and ``train_adapters_in_float32``; the child asserts adapters are float32 and the frozen linear weights
bfloat16. Memory is peak resident memory (VmHWM, reset after imports) minus resident memory before the model
was loaded; the planner's estimate for each dtype is printed beside it. Linux only. Results go in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_estimate  # noqa: E402
from memory_estimate import BATCH, CONFIG, LORA_TARGETS, SEQ, SMOKE_CONFIG, SMOKE_SEQ, rss_kib  # noqa: E402

DTYPES = {"float32": {"weight_bytes": 4, "bf16": False}, "bfloat16": {"weight_bytes": 2, "bf16": True}}


def measure(dtype_name: str, model_dir: Path, steps: int, seq: int) -> int:
    """Runs in a child process: bytes of peak resident memory from loading the model to the end of training."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    from vlm_pipeline.architectures import load_model
    from vlm_pipeline.training.trainer import train_adapters_in_float32

    dtype, bf16 = getattr(torch, dtype_name), DTYPES[dtype_name]["bf16"]
    torch.manual_seed(0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(0, vocab, (64, seq)).tolist()
    rows = Dataset.from_dict({"input_ids": tokens, "labels": tokens})
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: imports and data are not training memory
    before = rss_kib("VmRSS")
    model = load_model(model_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    args = TrainingArguments(
        output_dir=str(model_dir / f"out-{dtype_name}"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        use_cpu=True,
        bf16=bf16,
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)
    train_adapters_in_float32(trainer)
    for name, parameter in model.named_parameters():
        assert not parameter.requires_grad or parameter.dtype == torch.float32, (name, parameter.dtype)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            assert module.weight.dtype == dtype, (name, module.weight.dtype)
    trainer.train()
    return (rss_kib("VmHWM") - before) * 1024


def estimate(dtype_name: str, model_dir: Path, seq: int) -> float:
    """The planner's peak for this run: ``plan.memory_settings`` for its parameters (one process, the base loaded at
    this dtype, ``bf16`` for the bf16 run), with memory_estimate's LoRA case, and the two things this run does
    differently from our trainer: transformers' own loss over the whole logits (a plain Trainer, not TRL's chunked
    loss), on the CPU."""
    from vlm_pipeline.config.schema import MethodParams, SFTParams
    from vlm_pipeline.planning.memory import estimate_memory
    from vlm_pipeline.planning.model_shape import read_model_shape
    from vlm_pipeline.planning.plan import memory_settings

    method = MethodParams(learning_rate=1e-4, lora={"r": 16, "lora_alpha": 32, "target_modules": LORA_TARGETS})
    sft = SFTParams(per_device_train_batch_size=BATCH, optim="adamw_torch", bf16=DTYPES[dtype_name]["bf16"])
    settings = memory_settings(
        sft,
        method,
        {},  # no accelerate file: one process
        seq_len=seq,
        images_per_row=0.0,
        vision_tokens_per_image=0,
        load_bytes=DTYPES[dtype_name]["weight_bytes"],
    )
    settings = replace(settings, loss_chunk_tokens=None, device="cpu")
    return estimate_memory(read_model_shape(model_dir, method), settings)["peak_allocated"]


def save_model(model_dir: Path, config: dict) -> None:
    """The ~50M Llama (``config``), random weights, saved as bf16 safetensors: both runs load the same values."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    (model_dir / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(model_dir)).to(torch.bfloat16)
    model.save_pretrained(model_dir, safe_serialization=True)


def run_child(dtype_name: str, model_dir: Path, args: argparse.Namespace) -> int:
    command = [sys.executable, __file__, "--child", dtype_name, "--model-dir", str(model_dir)]
    command += ["--steps", str(args.steps), "--seq", str(args.seq)]
    child = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=SEQ, help=argparse.SUPPRESS)
    parser.add_argument(
        "--vocab",
        type=int,
        help="vocabulary size instead of the model's (32,000): two runs give the bytes each logit costs",
    )
    parser.add_argument("--smoke", action="store_true", help="a toy model, one step: checks the code still runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.seq = 1, SMOKE_SEQ
    if args.child:
        print(json.dumps({"bytes": measure(args.child, Path(args.model_dir), args.steps, args.seq)}))
        return
    mib = 2**20
    config = SMOKE_CONFIG if args.smoke else CONFIG
    if args.vocab:
        config = {**config, "vocab_size": args.vocab}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        save_model(model_dir, config)
        print(
            f"# {platform.machine()}, {platform.python_version()}; Llama {config['hidden_size']}×"
            f"{config['num_hidden_layers']}, vocabulary {config['vocab_size']}, LoRA r16 q/k/v/o, AdamW, "
            f"batch {BATCH} × {args.seq} tokens, {args.steps} steps"
        )
        # memory_estimate's fp32 tiny-model Trainer; its child reads steps, device and seq from the namespace.
        baseline_args = argparse.Namespace(steps=args.steps, device="cpu", seq=args.seq)
        machinery = memory_estimate.run_child("baseline", model_dir, baseline_args)
        print(f"training machinery alone (memory_estimate's baseline, fp32): {machinery / mib:.0f} MiB")
        print("| base dtype | measured MiB | measured − machinery MiB | estimate MiB |")
        print("|---|---|---|---|")
        measured, estimated = {}, {}
        for name in DTYPES:
            estimated[name] = estimate(name, model_dir, args.seq)
            if args.smoke and name == "float32":
                print(f"| {name} | not run (--smoke) | | {estimated[name] / mib:.0f} |", flush=True)
                continue
            measured[name] = run_child(name, model_dir, args)
            net = measured[name] - machinery
            print(
                f"| {name} | {measured[name] / mib:.0f} | {net / mib:.0f} | {estimated[name] / mib:.0f} |", flush=True
            )
        ratios = [f"estimate {estimated['bfloat16'] / estimated['float32']:.3f}"]
        if len(measured) == len(DTYPES):
            net_ratio = (measured["bfloat16"] - machinery) / (measured["float32"] - machinery)
            ratios[:0] = [f"measured {measured['bfloat16'] / measured['float32']:.3f}"]
            ratios[1:1] = [f"measured − machinery {net_ratio:.3f}"]
        print("bf16 / fp32: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
