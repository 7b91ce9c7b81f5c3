"""Our trainer against a plain TRL SFTTrainer script at the real models' shapes: tokens/s, MFU and memory.

Three steps, the first and last here (the project's venv), the middle one on the GPU machine:

    .venv/bin/python bench/gpu.py prepare --work bench/gpu_work        # data, tokenised Arrow, run configs, plans
    python3 bench/gpu.py run --work bench/gpu_work --out result.json  # on the H200 (its own python, wheels carried)
    .venv/bin/python bench/gpu.py report bench/gpu_h200.json           # the table again, from the raw JSON

`--smoke` does all three on this machine with tiny widths (`--device cpu`, 2 optimizer steps a side): every case
builds, trains on both sides and writes every field; the test suite runs it so that the GPU run cannot rot.

The models are built with random weights on the device from the real `conf/model_configs/*/config.json`, with the
language model cut in depth (`CASES`: every width, head count, vocabulary and vision setting real, the whole vision
tower kept). The tokenizers are the real 128k/152k vocabularies rebuilt offline (`tests/real_tokenizers.py`), with the
checkpoints' chat templates and processor settings. Records are generated here with a length spread like
instruction data: images at 11 resolutions (Qwen2.5-VL: 100-1,300 image tokens), prompts of 8-60 words, answers of
5-400 tokens (log-uniform).

Each case runs our trainer the way the training stage does (`accelerate launch -m vlm_pipeline.training.trainer
--config run_config.json` over the Arrow data our preprocessing wrote; the CPU smoke run calls the same module's
`run` in its own process) and then a plain TRL script on the same model
directory and records, given as TRL's conversational prompt-completion format (TRL's assistant-only loss refuses
the real Llama-3.1 template, so completion-only loss on prompt-completion records is TRL's supported way). Both sides
share batch size, precision (bf16 autocast over a bf16 base), attention (sdpa), optimizer, LoRA modules (scoped to
the language model, as ours) and gradient checkpointing; everything else is each side's default (ours: length-grouped
batches and the recipes' data-loader workers; TRL: random order, collation in the main process). Both are measured
by the same meter (`vlm_pipeline.training.throughput`), the plain side through a two-method subclass of SFTTrainer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASHEET_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16, the vendor's datasheet
WARMUP_STEPS = {"cuda": 5, "cpu": 1}
TIMED_STEPS = {"cuda": 20, "cpu": 1}
# Qwen2.5-VL's image sizes: (h/28)·(w/28) language tokens, 100 to 1,295, within max_pixels = 1280·28·28.
IMAGE_SIZES = [(280, 280), (336, 392), (448, 448), (420, 560), (504, 644), (560, 728), (644, 812), (672, 896),
               (756, 980), (896, 1008), (980, 1008)]  # fmt: skip
SMOKE_IMAGE_SIZES = [(56, 56), (56, 84), (84, 112)]
WORDS = ("the beam load wall column slab steel joint crack level floor roof frame brace tile pipe valve panel "
         "anchor bolt weld grade mortar screed rebar span deck truss footing plate gauge seal").split()  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One comparison: a model cut in depth, a method, its data and batch."""

    name: str
    what: str
    checkpoint: str  # folder under conf/model_configs
    architecture: str
    text_layers: int
    data: str  # vision, vision_one_tile (images of at most 560×560 px) or text
    batch: int
    lora: dict | None  # LoraParams fields; None: full fine-tuning
    learning_rate: float
    gradient_checkpointing: bool = False
    padding_free: bool = False
    image_bounds: dict = field(default_factory=dict)
    ours_workers: int = 0  # our data-loader workers (the GPU recipes' setting)


QWEN_BOUNDS = {"max_pixels": 1280 * 28 * 28}  # Qwen's documented bound: at most 1,280 image tokens
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
VISION_LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ATTENTION}
TEXT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ATTENTION[:3]}
CASES = (
    Case("a", "Qwen2.5-VL-7B, LoRA r8 q/k/v/o", "qwen2.5-vl-7b-instruct", "qwen2_5_vl", 8, "vision", 8,
         {**VISION_LORA, "modules_to_save": []}, 1e-4, image_bounds=QWEN_BOUNDS, ours_workers=4),
    Case("b", "Llama-3.2-11B-Vision, LoRA r8 q/k/v/o, one 560-px tile", "llama-3.2-11b-vision-instruct", "mllama", 10,
         "vision_one_tile", 8, {**VISION_LORA, "modules_to_save": []}, 1e-4, ours_workers=4),
    Case("c", "Llama-3.1-8B, LoRA r16 q/k/v, padding-free", "llama-3.1-8b-instruct", "llama", 8, "text", 16,
         {**TEXT_LORA, "modules_to_save": []}, 1e-4, padding_free=True),
    Case("d", "Qwen2.5-VL-7B, full FT, AdamW, gradient checkpointing", "qwen2.5-vl-7b-instruct", "qwen2_5_vl", 8,
         "vision", 8, None, 1e-5, gradient_checkpointing=True, image_bounds=QWEN_BOUNDS, ours_workers=4),
)  # fmt: skip
# TRL 1.13 cannot train Llama-3.2-Vision with its own collator. Its prompt-completion collation does not extend
# Mllama's cross_attention_mask over the completion (the cross-attention fails on the size mismatch), and its
# messages collation leaves the <|image|> token (id 128256, one past the output vocabulary) in the labels (the loss
# fails on the out-of-range target). So Mllama's plain side is what Llama-3.2-Vision TRL scripts do: the messages
# format, TRL's collator, and the image token masked out of the labels. The loss covers every other token instead
# of the answer's only: the same tokens, the same compute.
PLAIN_FORMAT = {"mllama": "messages"}
# --smoke's vision towers: two layers, 32 wide (the real patch, tile and window sizes kept).
TINY_VISION = {
    "qwen2_5_vl": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                   "fullatt_block_indexes": [1]},
    "mllama": {"num_hidden_layers": 2, "num_global_layers": 1, "hidden_size": 32, "intermediate_size": 64,
               "attention_heads": 2, "intermediate_layers_indices": [0], "vision_output_dim": 64},
}  # fmt: skip
TOKENIZER_FAMILY = {"qwen2_5_vl": "qwen2", "mllama": "llama3", "llama": "llama3"}


# ---------------------------------------------------------------- model configs


def cut_config(case: Case, tiny: bool) -> dict:
    """The real config.json, the language model cut to ``case.text_layers`` layers; ``tiny`` also shrinks widths."""
    config = json.loads((ROOT / "conf/model_configs" / case.checkpoint / "config.json").read_text())
    text = config["text_config"] if "text_config" in config else config
    layers = 2 if tiny else case.text_layers
    if case.architecture == "mllama":
        real_layers, real_cross = text["num_hidden_layers"], text["cross_attention_layers"]
        # Keep the real share of cross-attention layers (8 of 40) at the real offsets: 3, 8, ... below the cut.
        text["cross_attention_layers"] = [i for i in real_cross if i < layers] or [layers - 1]
        assert real_layers > layers
    text["num_hidden_layers"] = layers
    if "max_window_layers" in text:
        text["max_window_layers"] = layers
    if tiny:
        text.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
        if case.architecture in TINY_VISION:
            config["vision_config"].update(TINY_VISION[case.architecture])
        if case.architecture == "qwen2_5_vl":
            text["rope_scaling"]["mrope_section"] = [2, 3, 3]  # head_dim 16: 8 rotary pairs
    return config


def model_facts(case: Case, model_dir: Path) -> dict:
    """What the FLOP count needs, read off the real class built on the meta device from ``model_dir``."""
    import torch
    from transformers import AutoConfig

    from vlm_pipeline.architectures import get_architecture
    from vlm_pipeline.training.trainable import component_of, lora_target_modules

    architecture = get_architecture(case.architecture)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = architecture.model_class(config)
    counts = {"vision_tower": 0, "projector": 0, "language_model": 0, "embeddings": 0}
    for name, parameter in model.named_parameters():
        component = "embeddings" if "embed_tokens" in name else component_of(name, architecture)
        counts[component] += parameter.numel()
    text = config.get_text_config()
    facts = {
        "parameters": counts,
        "text_layers": text.num_hidden_layers,
        "text_hidden": text.hidden_size,
        "cross_attention_layers": len(getattr(text, "cross_attention_layers", None) or []),
    }
    if case.architecture == "qwen2_5_vl":
        vision = config.vision_config
        facts.update(
            vision_hidden=vision.hidden_size,
            vision_layers=vision.depth,
            vision_full_attention_layers=len(vision.fullatt_block_indexes),
            vision_window_patches=(vision.window_size // vision.patch_size) ** 2,
        )
    elif case.architecture == "mllama":
        vision = config.vision_config
        facts.update(
            vision_hidden=vision.hidden_size,
            vision_layers=vision.num_hidden_layers + vision.num_global_layers,
            vision_full_attention_layers=vision.num_hidden_layers + vision.num_global_layers,
            vision_window_patches=0,
        )
    if case.lora is not None:
        targets = lora_target_modules(model, architecture, case.lora["target_modules"])
        facts["lora_targets"] = targets
        selected = set(targets.split("|")) if isinstance(targets, str) else None  # escaped full names (a VLM)
        wanted = set(case.lora["target_modules"])
        lora = 0
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in wanted:
                continue
            if selected is None or re.escape(name) in selected:
                lora += case.lora["r"] * (module.in_features + module.out_features)
        facts["parameters"]["lora"] = lora
    return facts


def write_model_dir(case: Case, out: Path, tiny: bool) -> None:
    """config.json and the real tokenizer/processor (no weights: `run` builds those on the device)."""
    from transformers import (
        MllamaImageProcessor,
        MllamaProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    sys.path.insert(0, str(ROOT / "tests"))
    from real_tokenizers import real_tokenizer

    from vlm_pipeline.architectures import get_architecture

    real = get_architecture(case.architecture).real_checkpoint
    out.mkdir(parents=True, exist_ok=True)
    config = cut_config(case, tiny)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = real_tokenizer(TOKENIZER_FAMILY[case.architecture])
    template = real.chat_template()
    settings = real.image_processor_settings() if case.data != "text" else {}
    if case.architecture == "qwen2_5_vl":
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(**settings),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(**settings),
            chat_template=template,
        )
    elif case.architecture == "mllama":
        tokenizer.add_special_tokens({"additional_special_tokens": [real.special_tokens["image_token"]]})
        tokenizer.pad_token = real.special_tokens["pad_token"]  # 3.2-Vision sets one; 3.1 does not
        tokenizer.chat_template = template
        processor = MllamaProcessor(
            image_processor=MllamaImageProcessor(**settings), tokenizer=tokenizer, chat_template=template
        )
    else:
        processor = tokenizer
    processor.save_pretrained(out)
    real.generation_config(tokenizer).save_pretrained(out)


# ---------------------------------------------------------------- records


def batch_size(case: Case, smoke: bool) -> int:
    return 2 if smoke else case.batch


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def answer_words(rng: random.Random, smoke: bool) -> int:
    """5-400 tokens, log-uniform (most answers short, a long tail); about 1.3 tokens a word here."""
    tokens = math.exp(rng.uniform(math.log(5), math.log(40 if smoke else 400)))
    return max(2, round(tokens / 1.3))


def write_records(data: Path, n_vision: int, n_text: int, smoke: bool, seed: int = 0) -> None:
    """Vision records (our messages dialect, one image each; ``vision_one_tile``: images that fit one 560-px tile)
    and alpaca text records, with their images."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (data / "images").mkdir(parents=True, exist_ok=True)
    sizes = SMOKE_IMAGE_SIZES if smoke else IMAGE_SIZES
    names = []
    for i in range(len(sizes) * (1 if smoke else 4)):
        height, width = sizes[i % len(sizes)]
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.randrange(width), rng.randrange(height)
            r = rng.randrange(4, max(5, width // 4))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        names.append(f"images/img_{i:03d}_{width}x{height}.jpg")
        image.save(data / names[-1], quality=80)
    one_tile = [name for name, (height, width) in zip(names, sizes * 4, strict=False) if max(height, width) <= 560]
    for kind, images in (("vision", names), ("vision_one_tile", one_tile)):
        with (data / f"{kind}.jsonl").open("w") as out:
            for i in range(n_vision):
                question = words(rng, rng.randint(8, 16 if smoke else 60)).capitalize() + "?"
                answer = words(rng, answer_words(rng, smoke)).capitalize() + "."
                record = {
                    "messages": [
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                    ],
                    "images": [images[i % len(images)]],
                }
                out.write(json.dumps(record) + "\n")
    with (data / "text.jsonl").open("w") as out:
        for _ in range(n_text):
            record = {
                "instruction": words(rng, rng.randint(8, 20 if smoke else 150)).capitalize() + ".",
                "input": words(rng, rng.randint(0, 30)) if rng.random() < 0.3 else "",
                "output": words(rng, answer_words(rng, smoke)).capitalize() + ".",
            }
            out.write(json.dumps(record) + "\n")


def plain_records(valid: list[dict], vision: bool) -> list[dict]:
    """Our validated records as TRL's conversational prompt-completion records (the last assistant turn)."""
    from vlm_pipeline.data.formats import message_text

    rows = []
    for record in valid:
        messages = record["messages"]
        prompt = []
        for message in messages[:-1]:
            if vision:
                parts = [
                    {"type": "image"} if p.get("type") == "image" else {"type": "text", "text": p["text"]}
                    for p in message["content"]
                ]
                prompt.append({"role": message["role"], "content": parts})
            else:
                prompt.append({"role": message["role"], "content": message_text(message)})
        answer = message_text(messages[-1])
        completion = [{"role": "assistant", "content": [{"type": "text", "text": answer}] if vision else answer}]
        rows.append({"prompt": prompt, "completion": completion, "images": list(record.get("images") or [])})
    return rows


# ---------------------------------------------------------------- prepare (here)


def prepare(work: Path, smoke: bool, device: str, cases: tuple[str, ...] | None = None) -> None:
    from datasets import Dataset  # noqa: F401  (fail here, not halfway, without the venv)

    from vlm_pipeline.config.run import RunContext
    from vlm_pipeline.config.schema import MethodParams, ModelParams, PreprocessingParams, SFTParams
    from vlm_pipeline.data.validation import validate_lines
    from vlm_pipeline.pipelines.preprocessing.nodes import tokenize_split
    from vlm_pipeline.planning.plan import build_plan
    from vlm_pipeline.training.launcher import resolve_run_config, write_run_config

    steps = WARMUP_STEPS[device] + TIMED_STEPS[device]
    if work.exists():
        shutil.rmtree(work)
    data = work / "data"
    n_vision = max(batch_size(c, smoke) for c in CASES if c.data != "text") * steps
    n_text = max(batch_size(c, smoke) for c in CASES if c.data == "text") * steps
    write_records(data, n_vision, n_text, smoke)
    manifest = {
        "device": device,
        "smoke": smoke,
        "warmup_steps": WARMUP_STEPS[device],
        "timed_steps": TIMED_STEPS[device],
        "cases": {},
    }
    accelerate = ROOT / "conf/accelerate" / ("single_gpu.yaml" if device == "cuda" else "cpu_single_process.yaml")
    for case in CASES:
        if cases and case.name not in cases:
            continue
        started = time.perf_counter()
        model_dir = work / "models" / f"{case.checkpoint}-{case.text_layers}"
        if not (model_dir / "config.json").exists():
            write_model_dir(case, model_dir, tiny=smoke)
        lines = (data / f"{case.data}.jsonl").read_bytes().splitlines()
        valid = validate_lines(lines, data, max_image_pixels=10**8).valid
        context = RunContext(
            base_model=model_dir, image_root=data, model=ModelParams(dtype="bfloat16", attn_implementation="sdpa")
        )
        preprocessing = PreprocessingParams(max_length=4096, images=case.image_bounds)
        train, set_aside, _ = tokenize_split(valid, context, preprocessing)
        assert not set_aside, f"case {case.name}: records set aside: {list(set_aside)[:2]}"
        case_dir = work / case.name
        train.save_to_disk(str(case_dir / "train"))
        sft = SFTParams(
            accelerate_config=str(accelerate.relative_to(ROOT)),
            max_steps=steps,
            per_device_train_batch_size=batch_size(case, smoke),
            bf16=True,
            optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
            gradient_checkpointing=case.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if case.gradient_checkpointing else None,
            padding_free=case.padding_free,
            save_strategy="no",
            dataloader_num_workers=case.ours_workers if device == "cuda" else 0,
            dataloader_pin_memory=device == "cuda",
            seed=42,
        )
        method = MethodParams(learning_rate=case.learning_rate, lora=case.lora)
        config = resolve_run_config(
            context=context, train_dataset=case_dir / "train", image_bounds=preprocessing.images, sft=sft,
            method=method, checkpoint_root=case_dir / "ours/checkpoints", final_dir=case_dir / "ours/final",
        )  # fmt: skip
        write_run_config(config, case_dir / "run_config.json")
        plan = build_plan(
            model_dir=model_dir,
            sft=sft,
            method=method,
            images=preprocessing.images.model_dump(),
            records=len(train),
            lengths=list(train["length"]),
            max_length=preprocessing.max_length,
            load_dtype="bfloat16",
        )
        rows = plain_records(valid, case.data != "text")
        with (case_dir / "plain.jsonl").open("w") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
        facts = model_facts(case, model_dir)
        plain = {
            "model_dir": str(model_dir),
            "records": str(case_dir / "plain.jsonl"),
            "image_root": str(data),
            "format": PLAIN_FORMAT.get(case.architecture, "prompt-completion"),
            "image_bounds": {k: v for k, v in case.image_bounds.items() if v is not None},
            "lora": None if case.lora is None else {**case.lora, "target_modules": facts.get("lora_targets")},
            "args": {
                "max_steps": steps,
                "per_device_train_batch_size": batch_size(case, smoke),
                "learning_rate": case.learning_rate,
                "bf16": True,
                "optim": sft.optim,
                "gradient_checkpointing": case.gradient_checkpointing,
                "gradient_checkpointing_kwargs": sft.gradient_checkpointing_kwargs,
                "padding_free": case.padding_free,
                "save_strategy": "no",
                "report_to": "none",
                "seed": 42,
                "max_length": None,
                "use_cpu": device == "cpu",
                "model_init_kwargs": {"dtype": "bfloat16", "attn_implementation": "sdpa"},
            },
        }
        (case_dir / "plain.json").write_text(json.dumps(plain, indent=2))
        manifest["cases"][case.name] = {
            **asdict(case),
            "model_dir": str(model_dir),
            "records": len(train),
            "facts": facts,
            "planned_peak_allocated_gib": plan["memory_gib"]["peak_allocated"],
            "planned_memory_gib": plan["memory_gib"],
        }
        print(f"prepared case {case.name}: {len(train)} records, {time.perf_counter() - started:.1f} s", flush=True)
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2))


# ---------------------------------------------------------------- run (on the device)


def matmul_ceiling(device: str) -> float:
    """FLOP/s of a large bf16 matrix product on this device, timed after warm-up (random data, not zeros)."""
    import torch

    n = 8192 if device == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    repeats = 20 if device == "cuda" else 3
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def build_weights(architecture: str, model_dir: Path, device: str) -> float:
    """Random bf16 weights for the config in ``model_dir``, made on the device and saved beside it (safetensors)."""
    import torch
    from transformers import AutoConfig

    from vlm_pipeline.architectures import get_architecture

    if any(model_dir.glob("*.safetensors")):
        return 0.0
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = get_architecture(architecture).model_class._from_config(
            AutoConfig.from_pretrained(model_dir), dtype=torch.bfloat16
        )
    model.save_pretrained(model_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def flops_per_step(facts: dict, counts: dict, lora: bool) -> float:
    """Model FLOPs of one optimizer step from its counts (recomputation by gradient checkpointing not counted).

    Language model, per real token: 6·N (full FT) or 4·N for frozen weights (forward, and the backward to the
    inputs) plus 6·N_lora; N = its matmul weights with lm_head, without the embedding lookup. Causal self-attention:
    6·d·Σ len² per self-attention layer (forward 2·d·len², backward twice that). Vision tower, per patch: 2·N_vision
    when frozen (forward only: nothing before it trains) or 6·N_vision when trained, plus non-causal attention
    4·d·P² per full-attention layer and 4·d·P·window per windowed layer (× 3 when trained), P = patches per image.
    Not counted: Mllama's cross-attention scores and its K/V projections of the vision states (so its MFU is low)."""
    p = facts["parameters"]
    text = (4 if lora else 6) * p["language_model"] * counts["real_tokens"] + 6 * p.get("lora", 0) * counts[
        "real_tokens"
    ]
    self_layers = facts["text_layers"] - facts["cross_attention_layers"]
    text += 6 * facts["text_hidden"] * self_layers * counts["length_squares"]
    if not counts["vision_patches"]:
        return float(text)
    trained = 1 if lora else 3
    vision = 2 * trained * (p["vision_tower"] + p["projector"]) * counts["vision_patches"]
    full, layers, window = facts["vision_full_attention_layers"], facts["vision_layers"], facts["vision_window_patches"]
    attention = full * counts["vision_patch_squares"] + (layers - full) * window * counts["vision_patches"]
    vision += trained * 4 * facts["vision_hidden"] * attention
    return float(text + vision)


def side_result(
    summary: dict, history: list[dict], manifest: dict, facts: dict, lora: bool, ceilings: dict, wall: float
) -> dict:
    """Timed steps only (after the warm-up): seconds per step, tokens/s, pad share, MFU, peak memory; and the
    losses the side logged (``history``: the Trainer's log history), so a run that learned nothing shows."""
    steps = summary["steps"][manifest["warmup_steps"] :]
    seconds = [s["seconds"] for s in steps]
    total = sum(seconds)
    sums = {name: sum(s[name] for s in steps) for name in steps[0] if name not in ("step", "seconds")}
    flops = sum(flops_per_step(facts, s, lora) for s in steps)
    quartiles = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
    peak = summary.get("max_memory_allocated")
    return {
        "timed_steps": len(steps),
        "seconds_per_step": {
            "median": statistics.median(seconds),
            "p25": quartiles[0],
            "p75": quartiles[2],
            "min": min(seconds),
            "max": max(seconds),
        },
        "tokens_per_s": sums["tokens"] / total,
        "real_tokens_per_s": sums["real_tokens"] / total,
        "trained_tokens_per_s": sums["trained_tokens"] / total,
        "pad_share": 1 - sums["real_tokens"] / sums["tokens"],
        "counts": sums,
        "model_tflop_per_s": flops / total / 1e12,
        "mfu_datasheet": flops / total / ceilings["datasheet_bf16_flops"],
        "mfu_measured_matmul": flops / total / ceilings["measured_matmul_flops"],
        "max_memory_allocated_gib": None if peak is None else peak / 2**30,
        "wall_s": wall,
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        "train_loss": next(entry["train_loss"] for entry in history if "train_loss" in entry),
        "steps": summary["steps"],
    }


def run_side(command: list[str], env: dict, log: Path, timeout: float) -> float:
    started = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{' '.join(command[:6])} ... exited {result.returncode}:\n{tail}")
    return time.perf_counter() - started


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def run(work: Path, out: Path, only: list[str] | None, timeout: float, deadline: float = math.inf) -> dict:
    """Every case (or ``only`` these), each side within ``timeout`` s, all within ``deadline`` s of the start."""
    import torch

    from vlm_pipeline.config.run import RunConfig
    from vlm_pipeline.training.launcher import launch_command
    from vlm_pipeline.training.trainer import run as train_ours

    started = time.perf_counter()

    def time_left() -> float:
        left = min(timeout, deadline - (time.perf_counter() - started))
        if left < 20:
            raise RuntimeError(f"skipped: the {deadline:.0f} s deadline of the whole run is (nearly) reached")
        return left

    manifest = json.loads((work / "manifest.json").read_text())
    device = manifest["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this work folder was prepared for cuda, and no GPU is visible")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    result = {
        "machine": machine(device),
        "ceilings": {"datasheet_bf16_flops": DATASHEET_BF16_FLOPS, "measured_matmul_flops": matmul_ceiling(device)},
        "warmup_steps": manifest["warmup_steps"],
        "cases": {},
    }
    print(f"bf16 matmul: {result['ceilings']['measured_matmul_flops'] / 1e12:.1f} TFLOP/s", flush=True)
    for name, case in manifest["cases"].items():
        if only and name not in only:
            continue
        case_dir = work / name
        model_dir = Path(case["model_dir"])
        entry = {
            "what": case["what"],
            "facts": case["facts"],
            "records": case["records"],
            "batch": case["batch"],
            "planned_peak_allocated_gib": case["planned_peak_allocated_gib"],
        }
        try:
            entry["weights_built_s"] = build_weights(case["architecture"], model_dir, device)
            lora = case["lora"] is not None
            accelerate = json.loads((case_dir / "run_config.json").read_text())["sft"]["accelerate_config"]
            shutil.rmtree(case_dir / "ours", ignore_errors=True)
            if device == "cuda":  # each side a process of its own: its own peak memory, as a user's run would have
                command = launch_command(ROOT / accelerate, case_dir / "run_config.json")
                wall = run_side(command, env, case_dir / "ours.log", time_left())
            else:  # the smoke run on the CPU isolates nothing: this process, without two more start-ups a case
                wall = timed(train_ours, RunConfig.read(case_dir / "run_config.json"))
            summary = json.loads((case_dir / "ours/final/throughput.json").read_text())
            history = json.loads((case_dir / "ours/final/training_history.json").read_text())
            entry["ours"] = side_result(summary, history, manifest, case["facts"], lora, result["ceilings"], wall)
            plain_out = case_dir / "plain_throughput.json"
            if device == "cuda":
                command = [sys.executable, str(Path(__file__).resolve()), "plain", str(case_dir / "plain.json")]
                wall = run_side([*command, str(plain_out)], env, case_dir / "plain.log", time_left())
            else:
                wall = timed(plain, case_dir / "plain.json", plain_out)
            summary = json.loads(plain_out.read_text())
            history = summary.pop("log_history")
            entry["plain"] = side_result(summary, history, manifest, case["facts"], lora, result["ceilings"], wall)
            ours, theirs = entry["ours"], entry["plain"]
            entry["ratio_real_tokens_per_s"] = ours["real_tokens_per_s"] / theirs["real_tokens_per_s"]
            entry["ratio_tokens_per_s"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            if ours["max_memory_allocated_gib"]:
                entry["planned_over_measured_memory"] = (
                    case["planned_peak_allocated_gib"] / ours["max_memory_allocated_gib"]
                )
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            entry["error"] = str(error)[-4000:]
            print(f"case {name} failed: {entry['error']}", flush=True)
        shutil.rmtree(case_dir / "ours/final", ignore_errors=True)  # a full model's weights: not for $OUT
        result["cases"][name] = entry
        out.write_text(json.dumps(result, indent=2))  # after every case: a timeout keeps what was measured
        print(f"case {name} done", flush=True)
    return result


def machine(device: str) -> dict:
    import platform

    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for package in ("trl", "peft", "accelerate", "datasets"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


# ---------------------------------------------------------------- the plain TRL side (a subprocess of run)


def plain_inputs(spec: dict) -> tuple:
    """The plain side's dataset, processor and collator (None: TRL builds its own), as a TRL script sets them up."""
    import datasets
    from transformers import AutoProcessor, AutoTokenizer

    rows = [json.loads(line) for line in Path(spec["records"]).read_text().splitlines()]
    if spec["format"] == "messages":
        rows = [{"messages": row["prompt"] + row["completion"], "images": row["images"]} for row in rows]
    vision = any(row["images"] for row in rows)
    if vision:
        for row in rows:
            row["images"] = [str(Path(spec["image_root"]) / image) for image in row["images"]]
    dataset = datasets.Dataset.from_list(rows)
    if vision:  # decoded when a batch is collated, as a Hub image dataset would be
        dataset = dataset.cast_column("images", datasets.List(datasets.Image()))
        processor = AutoProcessor.from_pretrained(spec["model_dir"])
        bounds = spec["image_bounds"]
        if "max_pixels" in bounds:
            size = dict(processor.image_processor.size)
            processor.image_processor.size = {**size, "longest_edge": bounds["max_pixels"]}
        if "max_image_tiles" in bounds:
            processor.image_processor.max_image_tiles = bounds["max_image_tiles"]
    else:
        dataset = dataset.remove_columns("images")
        processor = AutoTokenizer.from_pretrained(spec["model_dir"])
    collator = None
    if spec["format"] == "messages" and vision:
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

        trl_collator = DataCollatorForVisionLanguageModeling(processor)
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

        def collator(examples: list[dict]) -> dict:
            batch = trl_collator(examples)
            batch["labels"][batch["labels"] == image_token_id] = -100
            return batch

    return dataset, processor, collator


def plain(spec_path: Path, out: Path) -> None:
    """A plain TRL script: SFTTrainer on prompt-completion records, with TRL's own collator and defaults."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from vlm_pipeline.training.throughput import MeteredTraining

    spec = json.loads(spec_path.read_text())
    dataset, processor, collator = plain_inputs(spec)

    class PlainSFTTrainer(MeteredTraining, SFTTrainer):
        """TRL's SFTTrainer with the step meter our trainer has, nothing else."""

    with tempfile.TemporaryDirectory() as output_dir:
        lora = spec["lora"]
        trainer = PlainSFTTrainer(
            model=spec["model_dir"],
            args=SFTConfig(output_dir=output_dir, **spec["args"]),
            train_dataset=dataset,
            processing_class=processor,
            data_collator=collator,
            peft_config=None if lora is None else LoraConfig(task_type="CAUSAL_LM", **lora),
        )
        trainer.train()
        summary = {**trainer.throughput.summary(), "log_history": trainer.state.log_history}
        out.write_text(json.dumps(summary, indent=2))


# ---------------------------------------------------------------- report


def report(result: dict) -> str:
    m, c = result["machine"], result["ceilings"]
    lines = [
        f"# {m.get('gpu', 'CPU')}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, "
        f"peft {m['peft']}; {m['date']}",
        f"# bf16 matmul measured {c['measured_matmul_flops'] / 1e12:.0f} TFLOP/s; datasheet "
        f"{c['datasheet_bf16_flops'] / 1e12:.0f}; warm-up {result['warmup_steps']} steps, then the timed steps",
        "| case | side | s/step median (p25-p75) | real tokens/s | all tokens/s | pad share | MFU datasheet | "
        "MFU measured matmul | peak allocated GiB | planned GiB (ratio) | mean training loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["cases"].items():
        if "error" in entry:
            lines.append(f"| {name} {entry['what']} | failed | {entry['error'].splitlines()[-1][:100]} |||||||| ")
            continue
        for side in ("ours", "plain"):
            r = entry[side]
            s = r["seconds_per_step"]
            memory = r["max_memory_allocated_gib"]
            planned = (
                f"{entry['planned_peak_allocated_gib']:.2f} ({entry['planned_over_measured_memory']:.2f})"
                if side == "ours" and memory
                else ""
            )
            lines.append(
                f"| {name} {entry['what'] if side == 'ours' else ''} | {side} | {s['median']:.3f} "
                f"({s['p25']:.3f}-{s['p75']:.3f}) | {r['real_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
                f"{r['pad_share']:.1%} | {r['mfu_datasheet']:.1%} | {r['mfu_measured_matmul']:.1%} | "
                f"{'' if memory is None else f'{memory:.2f}'} | {planned} | {r['train_loss']:.3f} |"
            )
        lines.append(
            f"| {name} | **ours / plain** | | **{entry['ratio_real_tokens_per_s']:.2f}** | "
            f"{entry['ratio_tokens_per_s']:.2f} | | | | | | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="prepare, run and report here: tiny widths, CPU")
    parser.add_argument("--out", type=Path, help="with --smoke: keep the result JSON here")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("prepare", help="data, tokenised Arrow, run configs and plans (the project's venv)")
    p.add_argument("--work", type=Path, default=Path("bench/gpu_work"))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny widths (what --smoke uses)")
    r = sub.add_parser("run", help="build the weights, train both sides per case, write the JSON (the GPU machine)")
    r.add_argument("--work", type=Path, default=Path("bench/gpu_work"))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--cases", nargs="*", help="only these cases (a b c d)")
    r.add_argument("--timeout", type=float, default=240, help="seconds for one side of one case")
    r.add_argument("--deadline", type=float, default=math.inf, help="seconds for the whole run; later sides skip")
    q = sub.add_parser("plain", help="the plain TRL side of one case (run starts it)")
    q.add_argument("spec", type=Path)
    q.add_argument("out", type=Path)
    t = sub.add_parser("report", help="print the table of a result JSON")
    t.add_argument("result", type=Path)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / "work"
            prepare(work, smoke=True, device="cpu")
            result = run(work, args.out or Path(tmp) / "result.json", None, timeout=600)
            print(report(result))
            failed = [name for name, entry in result["cases"].items() if "error" in entry]
            if failed:
                raise SystemExit(f"cases failed: {failed}")
    elif args.command == "prepare":
        prepare(args.work, smoke=args.tiny, device=args.device)
    elif args.command == "run":
        print(report(run(args.work, args.out, args.cases, args.timeout, args.deadline)))
    elif args.command == "plain":
        plain(args.spec, args.out)
        os._exit(0)  # as our trainer's workers leave (no teardown of worker threads)
    elif args.command == "report":
        print(report(json.loads(args.result.read_text())))
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
