"""`vlm-pipeline predict`: one answer from a model, or from a base plus a LoRA adapter, for each architecture."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import PROJECT_ROOT
from peft import LoraConfig, get_peft_model

from vlm_pipeline import commands
from vlm_pipeline.architectures import load_model

pytestmark = pytest.mark.slow  # Kedro sessions, subprocesses or training runs: `make test` only

IMAGE = PROJECT_ROOT / "data/01_raw/shapes_vqa/images/test_0000.png"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def predict(capsys):
    """`vlm-pipeline predict` through the command's entry point in this process, its output captured as a pipe
    would take it (not a terminal): a subprocess would spend about 6 s importing what this worker holds. The
    console script itself runs in test_dvc (the DVC stages) and test_errors."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            commands.main(["predict", *args, "--max-new-tokens", "8"])
        captured = capsys.readouterr()
        return Result(exit_info.value.code, captured.out, captured.err)

    return run


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "mllama", "llama"])
def test_predict_answers_for_each_architecture(arch, tiny_models, predict):
    image = ["--image", str(IMAGE)] if arch != "llama" else []
    result = predict("--model", str(tiny_models[arch]), *image, "--prompt", "What shape is this?")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()  # tiny random models answer gibberish, but they answer
    # Not a terminal: no weight-loading bar, and no bitsandbytes note about a kernel from the Hub (warning_filters).
    assert "Loading weights" not in result.stderr and "kernels-community" not in result.stderr, result.stderr
    wrong = predict(
        "--model",
        str(tiny_models[arch]),
        *(["--image", str(IMAGE)] if arch == "llama" else []),
        "--prompt",
        "What shape is this?",
    )
    assert wrong.returncode == 2 and ("text-only model" in wrong.stderr or "vision model" in wrong.stderr)


def test_base_plus_adapter_answers_as_the_merged_model(tmp_path, tiny_models, predict):
    torch.manual_seed(0)
    model = get_peft_model(
        load_model(tiny_models["qwen2_5_vl"]),
        LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "video_preprocessor_config.json",
    ):
        if (tiny_models["qwen2_5_vl"] / name).is_file():
            (tmp_path / "merged" / name).write_bytes((tiny_models["qwen2_5_vl"] / name).read_bytes())
    prompt = ["--image", str(IMAGE), "--prompt", "What shape is this?"]
    with_adapter = predict("--model", str(tiny_models["qwen2_5_vl"]), "--adapter", str(tmp_path / "adapter"), *prompt)
    from_merged = predict("--model", str(tmp_path / "merged"), *prompt)
    plain = predict("--model", str(tiny_models["qwen2_5_vl"]), *prompt)
    assert with_adapter.returncode == from_merged.returncode == plain.returncode == 0, with_adapter.stderr[-2000:]
    assert with_adapter.stdout == from_merged.stdout
    assert with_adapter.stdout != plain.stdout  # the adapter is applied
