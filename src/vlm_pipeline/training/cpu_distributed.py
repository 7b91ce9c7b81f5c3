"""Let FSDP and DeepSpeed runs launched on CPUs (gloo) use the engine they ask for. Used only without a GPU.

Upstream limitation (accelerate 1.15, ``AcceleratorState.__init__``): the FSDP plugin is honoured only for GPU-like
distributed types and the DeepSpeed plugin only when ``cpu`` is false. With ``use_cpu: true`` and several
processes the state becomes ``MULTI_CPU`` and the run silently trains as plain DDP. These engines themselves work
on gloo (FSDP2 ``fully_shard``; DeepSpeed ZeRO with its CPU accelerator), so after the Trainer has built its
Accelerator this module switches the shared state to the engine ``accelerate launch`` asked for, exactly as
accelerate would have on GPUs. Nothing here runs when a GPU is present. Used by tests and laptops to exercise
the real distributed code paths; production runs on GPUs never touch it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType


def _asked(engine: str) -> bool:
    # Set by `accelerate launch` from the config file's distributed_type (accelerate's own convention).
    return os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"


def needs_adjustment(accelerator: Any) -> bool:
    return (
        not torch.cuda.is_available()
        and accelerator.state.distributed_type == DistributedType.MULTI_CPU
        and (_asked("FSDP") or _asked("DEEPSPEED"))
    )


def adopt_requested_engine(trainer: Any) -> None:
    """Switch ``trainer.accelerator``'s state from MULTI_CPU to the FSDP or DeepSpeed engine that was launched."""
    state = trainer.accelerator.state
    if _asked("FSDP"):
        from accelerate.utils import FullyShardedDataParallelPlugin

        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
        _set_distributed_type(state, DistributedType.FSDP)
        trainer.is_fsdp_enabled = True
    else:
        from accelerate.utils import DeepSpeedPlugin
        from transformers.integrations.deepspeed import propagate_args_to_deepspeed

        plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables accelerate launch set
        plugin.set_mixed_precision(state.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        _set_distributed_type(state, DistributedType.DEEPSPEED)
        trainer.is_deepspeed_enabled = True
        propagate_args_to_deepspeed(trainer.accelerator, trainer.args)


def _set_distributed_type(state: Any, distributed_type: DistributedType) -> None:
    # AcceleratorState copies PartialState's shared fields each time it is constructed (transformers does so
    # often), so the type is set in both, as accelerate itself does at the end of AcceleratorState.__init__.
    state.distributed_type = distributed_type
    PartialState._shared_state["distributed_type"] = distributed_type
