"""Checks before any node runs: the conf environment, the schema, the paths the parameters name, then what the
schema cannot see alone (this machine, the accelerate file).

Called by a Kedro hook (``vlm_pipeline.hooks``), so ``kedro run`` and ``dvc repro`` stop in seconds on a misspelt
``--env``, a typo, a model or data folder that is not there, a GPU recipe on a machine without GPUs, or an
accelerate file that disagrees with the parameters. Each check raises :class:`ConfigError` with one line: the
parameter, the value, and what to do.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from vlm_pipeline.config.schema import ATTENTION_PACKAGES, ConfigError, Parameters, validate_parameters

logger = logging.getLogger(__name__)

BITSANDBYTES_OPTIMIZERS = {
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "lion_8bit",
    "paged_lion_8bit",
}


# A value a recipe environment leaves to the user (conf/<recipe env>/globals.yml): ``<what to give>``, which no real
# path looks like, so a recipe never runs on the demo's data or on a made-up model path by default.
PLACEHOLDER = re.compile(r"^<[^<>]+>$")


def is_placeholder(value: str) -> bool:
    """Whether a path parameter is still a recipe's ``<...>`` placeholder."""
    return bool(PLACEHOLDER.match(str(value).strip()))


def check_parameters(params: dict[str, Any], project_root: Path | None = None) -> Parameters:
    """Validate every parameter group, then check them against this machine; return the typed parameters."""
    parsed = validate_parameters(params)
    check_machine(parsed, project_root or Path.cwd())
    if parsed.model.trust_remote_code:
        logger.warning(
            "model.trust_remote_code is true: Python files inside %s will run. Use it only for checkpoints you trust.",
            parsed.base_model,
        )
    return parsed


def check_environment(conf_source: str | Path, env: str | None) -> None:
    """A named conf environment must be a folder of ``conf_source``. Kedro finds out only when a hook first reads
    the configuration, and kedro-mlflow's hook does that first with its defaults, so a misspelt ``--env`` would
    surface as an MLflow store error. A remote or packaged ``conf_source`` is left to Kedro."""
    conf = Path(conf_source)
    if env is None or not conf.is_dir() or (conf / env).is_dir():
        return
    available = ", ".join(sorted(folder.name for folder in conf.iterdir() if _is_environment(folder)))
    raise ConfigError(f"conf environment {env!r} does not exist: {conf.name}/{env}; available: {available}")


def _is_environment(folder: Path) -> bool:
    """A conf folder holding Kedro configuration (conf/accelerate and conf/model_configs hold other files)."""
    return folder.is_dir() and any(folder.glob("*.yml"))


def check_paths(params: Parameters, project_root: Path) -> None:
    """Every file or folder a parameter names must exist before the run starts, not when the node that reads it
    runs. The model folder is the exception: only the stages that read it need it (:func:`check_base_model`)."""
    if is_placeholder(params.raw_data):
        raise ConfigError(
            f"raw_data is the placeholder {params.raw_data}: set it to the folder holding your train.jsonl and its "
            "images (kedro run --params raw_data=DIR, or raw_data in conf/<env>/globals.yml)"
        )
    raw_data = _resolved(params.raw_data, project_root)
    if not raw_data.is_dir():
        raise ConfigError(
            f"raw_data: {params.raw_data} does not exist: give the folder holding train.jsonl and its images "
            "(kedro run --params raw_data=DIR, or raw_data in conf/<env>/globals.yml)"
        )
    if not (raw_data / "train.jsonl").is_file():
        raise ConfigError(f"raw_data: {params.raw_data} has no train.jsonl: give the folder that holds it")
    template = params.preprocessing.chat_template
    if template is not None and not _resolved(template, project_root).is_file():
        raise ConfigError(
            f"preprocessing.chat_template: {template} does not exist: give a .jinja file "
            "(conf/model_configs/*/chat_template.jinja), or null for the checkpoint's own"
        )
    accelerate_file(params, project_root)


def check_base_model(base_model: str, project_root: Path) -> None:
    """The model folder must be a checkpoint before a run that reads it starts (it is read only after validation,
    several minutes in on real data); a data-validation-only run never needs one."""
    if is_placeholder(base_model):
        raise ConfigError(
            f"base_model is the placeholder {base_model}: set it to the local checkpoint folder "
            "(kedro run --params base_model=DIR, or base_model in conf/<env>/globals.yml)"
        )
    folder = _resolved(base_model, project_root)
    if not folder.is_dir():
        raise ConfigError(
            f"base_model: {base_model} does not exist: point it at a local checkpoint folder "
            "(kedro run --params base_model=DIR), or build the tiny default with `make model`"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"base_model: {base_model} has no config.json: point it at a Hugging Face checkpoint folder "
            "(the one holding config.json and the safetensors)"
        )


def accelerate_file(params: Parameters, project_root: Path) -> Path:
    """The accelerate config file ``sft.accelerate_config`` names; ConfigError listing the shipped ones if absent."""
    path = _resolved(params.sft.accelerate_config, project_root)
    if not path.is_file():
        shipped = sorted(file.name for file in (project_root / "conf/accelerate").glob("*.yaml"))
        raise ConfigError(
            f"sft.accelerate_config: {params.sft.accelerate_config} does not exist: use a file of conf/accelerate/"
            + (f" ({', '.join(shipped)})" if shipped else "")
        )
    return path


def _resolved(path: str, project_root: Path) -> Path:
    """A parameter's path as the run reads it: relative paths are relative to the project folder."""
    return project_root / Path(path).expanduser()


def check_machine(params: Parameters, project_root: Path) -> None:
    """Settings this machine cannot run: they would otherwise fail only after the model has loaded."""
    sft = params.sft
    accelerate = yaml.safe_load(accelerate_file(params, project_root).read_text()) or {}
    on_cpu = bool(accelerate.get("use_cpu"))
    if not on_cpu:
        import torch  # only to count GPUs: a run on CPUs (the demo's data stages) never imports it here

        gpus = torch.cuda.device_count()
        wanted = int(accelerate.get("num_processes", 1)) // max(int(accelerate.get("num_machines", 1)), 1)
        if gpus < max(wanted, 1):
            raise ConfigError(
                f"{sft.accelerate_config} runs {max(wanted, 1)} process(es) per machine on GPUs, but this machine "
                f"has {gpus} GPU(s): use a conf/accelerate/cpu_*.yaml file here, or run on the GPU machine"
            )
        if sft.bf16 and not torch.cuda.is_bf16_supported():
            raise ConfigError("sft.bf16 is true but this machine's GPU has no bf16 (pre-Ampere); set sft.fp16 instead")
    _check_accelerate_agrees(accelerate, params, sft.accelerate_config)
    quantized = [
        name
        for name, variant in (("lora", params.lora), ("full_ft", params.full_ft))
        if variant and variant.method.quantization and variant.method.quantization.enabled
    ]
    attention = params.model.attn_implementation
    package = ATTENTION_PACKAGES.get(attention)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"model.attn_implementation {attention} needs the {package} package, which is not installed in this "
            "environment: install it on the GPU machine, or use sdpa"
        )
    if (quantized or sft.optim in BITSANDBYTES_OPTIMIZERS) and importlib.util.find_spec("bitsandbytes") is None:
        needs = f"{quantized[0]}.method.quantization" if quantized else f"sft.optim {sft.optim}"
        raise ConfigError(f"{needs} needs bitsandbytes, which is not installed in this environment")


def _check_accelerate_agrees(accelerate: dict[str, Any], params: Parameters, name: str) -> None:
    """DeepSpeed reads its own accumulation and precision: a mismatch fails late inside DeepSpeed or silently."""
    sft = params.sft
    deepspeed = accelerate.get("deepspeed_config") or {}
    accumulation = deepspeed.get("gradient_accumulation_steps")
    if accumulation not in (None, "auto") and int(accumulation) != sft.gradient_accumulation_steps:
        raise ConfigError(
            f"{name} sets gradient_accumulation_steps {accumulation} but sft.gradient_accumulation_steps is "
            f"{sft.gradient_accumulation_steps}: make them equal (or set 'auto' in the accelerate file)"
        )
    precision = accelerate.get("mixed_precision", "no")
    wanted = "bf16" if sft.bf16 else "fp16" if sft.fp16 else "no"
    if precision not in ("no", wanted):
        raise ConfigError(f"{name} sets mixed_precision {precision} but sft asks for {wanted}: make them agree")
