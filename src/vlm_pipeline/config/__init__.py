"""The parameter schema and the checks that run before any node or model: ``check_parameters`` is the entry.

- ``schema``: one pydantic model per stage, every field with its help text and range. Unknown keys fail with
  the closest valid key; the seeds' older names are mapped (with a warning) or rejected with the new name.
- ``checks``: what the schema cannot see alone: the machine (GPUs, bf16, bitsandbytes) and the accelerate
  config file against the parameters.
"""

from vlm_pipeline.config.checks import check_machine, check_parameters
from vlm_pipeline.config.schema import (
    LAUNCHER_KEYS,
    ConfigError,
    MethodParams,
    ModelParams,
    Parameters,
    SFTParams,
    normalise_sft,
    validate_parameters,
)

__all__ = [
    "LAUNCHER_KEYS",
    "ConfigError",
    "MethodParams",
    "ModelParams",
    "Parameters",
    "SFTParams",
    "check_machine",
    "check_parameters",
    "normalise_sft",
    "validate_parameters",
]
