"""Peak memory per GPU, term by term, from a model's shape and a run's settings.

What the terms count (bytes per device):
- weights: frozen parameters at their load dtype or quantized width, trainable ones at their own dtype;
  sharded over the world by ZeRO-3 and FSDP, plus the layers those gather for compute;
- gradients: one per trainable parameter (sharded by ZeRO-2/3 and FSDP; DDP adds its bucket copy);
- optimizer states: AdamW 8 bytes per trainable parameter, 8-bit AdamW 2, Adafactor its factored second
  moment, DeepSpeed's fp32 master copy 4 more; sharded by ZeRO and FSDP, zero on the GPU when offloaded;
- activations: what backward needs, per layer and token (an accounting of a Llama-style decoder layer under
  SDPA attention), or only each layer's input under gradient checkpointing plus one layer being recomputed;
  the logits and the loss's fp32 copies; the vision tower's only when it trains;
- the optimizer step's temporaries (the foreach AdamW's denominators);
- framework overhead: the CUDA context and allocator slack, which ``torch.cuda.max_memory_allocated`` leaves
  out: reported apart, and added for the verdict.

The peak is the larger of the end of the forward pass (activations held, gradients being made) and the optimizer
step (all gradients and states). Validated against CPU measurements and published figures in bench/RESULTS.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # model_shape imports torch and transformers; the arithmetic here needs neither
    from vlm_pipeline.planning.model_shape import ModelShape, Stack

GIB = 1024**3
# bitsandbytes bytes per quantized weight: int8 plus a per-row fp32 scale (negligible); NF4 with a 1-byte absmax per
# 64 weights and, double-quantized, an fp32 constant per 256 absmax.
QUANTIZED_BYTES = {8: 1.0, 4: 0.5 + 1 / 64 + 4 / (64 * 256)}
CUDA_CONTEXT_BYTES = 0.75 * GIB
ALLOCATOR_SLACK = 0.05


@dataclass
class MemorySettings:
    world_size: int = 1
    engine: str = "single"
    """single, ddp, fsdp (full shard), zero2 or zero3."""
    offload_optimizer: bool = False
    offload_params: bool = False
    weight_bytes: int = 4
    """Bytes of an unquantized parameter in the module: 4 (our trainer loads float32 and trains under autocast),
    2 for a bf16 module (DeepSpeed with bf16 casts the module, keeping an fp32 master copy)."""
    bf16_compute: bool = False
    """bf16/fp16 activations (mixed precision or a bf16 model)."""
    quantization_bits: int | None = None
    double_quant: bool = True
    optimizer: str = "adamw_torch"
    batch_size: int = 1
    """Rows per micro-batch; with ``tokens_per_batch``, the rows of the micro-batch with the most images (the
    vision tower's batch)."""
    seq_len: int = 512
    tokens_per_batch: int | None = None
    """``sft.max_tokens_per_batch``: the language model's tokens per micro-batch (pad tokens included), in place of
    ``batch_size × seq_len``. None: rows are counted."""
    images_per_row: float = 0.0
    vision_tokens_per_image: int = 0
    video_patches_per_row: float = 0.0
    """The vision tower's sequence from videos, per row: the set's video patches (each video's count, recorded at
    preprocessing: ``video_samples``' ``patches``) over its rows, as ``images_per_row`` counts images."""
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    loss_chunks: int = 1
    """The output projection and cross-entropy computed in chunks of the sequence (torchtune does; transformers
    does not): only one chunk's logits exist at a time."""
    loss_chunk_tokens: int | None = None
    """TRL's ``chunked_nll`` loss (SFTTrainer's default, so our trainer's): only trained positions reach the output
    projection, this many at a time, each chunk recomputed in backward. None: the whole logits tensor."""
    fp32_norms: bool | None = None
    """Norms and residual stream in float32; default: beside a quantized base (PEFT's k-bit preparation)."""
    device: str = "cuda"
    """cuda, or cpu: CPU runs of bench/memory_estimate.py hold about one more logits-sized fp32 buffer than the
    terms count, which is added (4 bytes per logit). It is not in the loss itself, which grows by 12 bytes per logit
    on CPU as on GPU (bench/RESULTS.md, memory_dtype); where it is was not found."""


def optimizer_state_bytes(
    optimizer: str, trainable: int, matrices: list[tuple[int, ...]], parameter_bytes: int = 4
) -> float:
    """Optimizer state bytes for ``trainable`` parameters whose tensors have the shapes ``matrices``; torch's AdamW
    keeps its moments in the parameters' dtype (``parameter_bytes``: 2 for a bf16 model trained in place)."""
    if optimizer.startswith("adafactor"):  # no first moment (beta1 None); row + column second moment per matrix
        return 4.0 * sum(shape[0] + shape[1] if len(shape) == 2 else math.prod(shape) for shape in matrices)
    if "8bit" in optimizer:
        return 2.0 * trainable  # two uint8 states; per-block fp32 absmax adds under 0.5%
    if optimizer.startswith("sgd"):
        return 0.0
    return 2.0 * parameter_bytes * trainable  # AdamW: exp_avg and exp_avg_sq (paged variants included)


def estimate_memory(shape: ModelShape, settings: MemorySettings) -> dict[str, float]:
    """Bytes per device for each term, the peak, and the total with framework overhead."""
    world = settings.world_size
    deepspeed = settings.engine in ("zero2", "zero3")
    param_bytes = settings.weight_bytes
    weights = _weight_bytes(shape, settings)
    if settings.engine in ("zero3", "fsdp"):
        weights = weights / world if not settings.offload_params else 0.0
        weights += 2 * shape.largest_layer * (2 if settings.bf16_compute else param_bytes)  # gathered + prefetched

    grads = shape.trainable * (4.0 if shape.lora else param_bytes)  # adapters are fp32
    if settings.engine in ("zero2", "zero3", "fsdp"):
        grads /= world
    elif settings.engine == "ddp" and world > 1:
        grads *= 2  # DDP's reduction buckets hold a second copy

    # LoRA adapters train in fp32; DeepSpeed steps an fp32 master copy; otherwise the model's own dtype.
    state_bytes = 4 if shape.lora or deepspeed else param_bytes
    states = optimizer_state_bytes(settings.optimizer, shape.trainable, shape.trainable_matrices, state_bytes)
    if deepspeed and param_bytes < 4:
        states += 4.0 * shape.trainable  # fp32 master weights
    if settings.engine in ("zero2", "zero3", "fsdp"):
        states /= world
    if settings.offload_optimizer:
        states = 0.0
    step_temporaries = 0.0 if "fused" in settings.optimizer or "8bit" in settings.optimizer else 4.0 * shape.trainable
    if settings.engine in ("zero2", "zero3", "fsdp"):
        step_temporaries /= world
    if settings.offload_optimizer or settings.optimizer.startswith(("adafactor", "sgd")):
        step_temporaries = 0.0

    activations = _activation_bytes(shape, settings)
    logits = _logits_bytes(shape, settings)
    one_layer = _layer_bytes(shape.text, settings) * batch_tokens(settings)
    held_grads = grads if settings.gradient_accumulation_steps > 1 else 0.0
    forward_end = weights + states + held_grads + activations + logits
    backward_end = weights + states + grads + one_layer
    optimizer_step = weights + states + grads + step_temporaries
    peak = max(forward_end, backward_end, optimizer_step)
    overhead = CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * peak
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer_states": states,
        "activations": activations,
        "logits_and_loss": logits,
        "optimizer_step_temporaries": step_temporaries,
        "peak_allocated": peak,
        "framework_overhead": overhead,
        "total": peak + overhead,
    }


def _weight_bytes(shape: ModelShape, settings: MemorySettings) -> float:
    if not shape.lora:  # full fine-tuning: every weight in the module's dtype, trained or frozen
        return shape.total * float(settings.weight_bytes)
    frozen = float(shape.total)
    quantized = 0.0
    if settings.quantization_bits:
        quantized = float(shape.linear_weights.get("language_model", 0))
        per_weight = QUANTIZED_BYTES[settings.quantization_bits]
        if settings.quantization_bits == 4 and not settings.double_quant:
            per_weight = 0.5 + 4 / 64
        frozen -= quantized
        quantized *= per_weight
    # Adapters (and modules_to_save copies) stay fp32, as PEFT keeps them.
    return frozen * settings.weight_bytes + quantized + shape.trainable * 4.0


def _layer_bytes(stack: Stack, settings: MemorySettings) -> float:
    """Bytes saved for backward by one layer, per token.

    Per token of a Llama-style layer: each RMSNorm keeps its input, its normalised value and its output (3h,
    twice); attention keeps q and k after RoPE, v, the output and o_proj's input (5h, with k and v expanded to
    all heads); a SwiGLU MLP keeps gate, SiLU(gate), up and their product (4 × intermediate), a plain MLP two.
    Under mixed precision the norms and the residual stream stay in the weights' dtype.
    """
    activation = 2 if settings.bf16_compute else 4
    residual = _residual_bytes(settings)
    mlp = (4 if stack.gated_mlp else 2) * stack.intermediate
    return 6 * stack.hidden * residual + (5 * stack.hidden + mlp) * activation


def _residual_bytes(settings: MemorySettings) -> int:
    # The residual stream has the dtype of the module's norms: float32 beside a quantized base (PEFT's k-bit
    # preparation casts them), else the module's own.
    fp32_norms = settings.fp32_norms if settings.fp32_norms is not None else bool(settings.quantization_bits)
    return 4 if fp32_norms else settings.weight_bytes


def batch_tokens(settings: MemorySettings) -> int:
    """The language model's tokens in one micro-batch: the token budget, or rows × the longest row."""
    return settings.tokens_per_batch or settings.batch_size * settings.seq_len


def _activation_bytes(shape: ModelShape, settings: MemorySettings) -> float:
    tokens = batch_tokens(settings)
    total = _stack_activations(shape.text, tokens, settings)
    per_row = settings.images_per_row * settings.vision_tokens_per_image + settings.video_patches_per_row
    if shape.vision is not None and per_row and shape.trains_vision:
        total += _stack_activations(shape.vision, int(settings.batch_size * per_row), settings)
    return total


def _stack_activations(stack: Stack, tokens: int, settings: MemorySettings) -> float:
    if settings.gradient_checkpointing:  # each layer's input, plus one layer recomputed in backward
        return stack.layers * tokens * stack.hidden * _residual_bytes(settings) + tokens * _layer_bytes(stack, settings)
    return stack.layers * tokens * _layer_bytes(stack, settings)


def _logits_bytes(shape: ModelShape, settings: MemorySettings) -> float:
    """The output projection and the loss: chunked (TRL) or whole (transformers' own loss, a plain Trainer's).

    Chunked (TRL's ``chunked_nll``): one chunk's fp32 logits, log-probabilities, the two temporaries of TRL's
    entropy metric and, in the recomputed backward, the logits' gradient (five chunk-wide fp32 buffers; four
    measured on CPU for a single chunk), plus the trained positions' hidden states gathered and their gradient.

    Whole (``ForCausalLMLoss``): in the forward, the logits in the compute dtype, their fp32 upcast
    (``logits.float()``; the same tensor when they are fp32) and log-softmax's fp32 output; at the start of the
    backward, the log-softmax output (saved: its backward reads its output, not its input), the gradient nll_loss
    hands it and the logits' fp32 gradient. By then the logits and their upcast are gone (Trainer.compute_loss keeps
    only the loss), so the backward's 12 bytes per logit are the peak in both dtypes: bf16 logits cost what fp32
    ones do (10 bytes in the forward against 8). Measured on CPU, bench/memory_dtype.py's run grows by 12.1 (fp32)
    and 12.9 (bf16) bytes per logit when its vocabulary doubles (bench/RESULTS.md)."""
    tokens = batch_tokens(settings)
    activation = 2 if settings.bf16_compute else 4
    if settings.loss_chunk_tokens:
        return settings.loss_chunk_tokens * shape.vocab * 5 * 4 + 2 * tokens * shape.text.hidden * activation
    upcast = 4 if activation == 2 else 0
    forward, backward = activation + upcast + 4, 4 + 4 + 4
    cpu_buffer = 4 if settings.device == "cpu" else 0
    return tokens * shape.vocab * (max(forward, backward) + cpu_buffer) / settings.loss_chunks
