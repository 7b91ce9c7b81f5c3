"""The parameter schema and the checks that run before any node or model: ``check_parameters`` is the entry.

- ``schema``: one pydantic model per stage, every field with its help text and range. Unknown keys fail with
  the closest valid key; the seeds' older names are mapped (with a warning) or rejected with the new name, and
  TRL names this project keeps elsewhere (``sft.learning_rate``) are rejected naming the key to use.
- ``checks``: what the schema cannot see alone: the conf environment, the files and folders the parameters name,
  the machine (GPUs, bf16, bitsandbytes) and the accelerate config file against the parameters.
"""

from vlm_pipeline.config.checks import (
    check_base_model,
    check_environment,
    check_machine,
    check_parameters,
    check_paths,
)
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
    "check_base_model",
    "check_environment",
    "check_machine",
    "check_parameters",
    "check_paths",
    "normalise_sft",
    "validate_parameters",
]
