"""Trainable parts: components frozen by parameter, LoRA kept in a VLM's language model unless a regex says
otherwise, and the per-component table."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model

from vlm_pipeline.architectures import architecture_for_model, load_model
from vlm_pipeline.training.trainable import component_of, freeze, lora_target_modules, parameter_table


def lora_components(model, architecture, target_modules) -> set[str]:
    targets = lora_target_modules(model, architecture, target_modules)
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    return {component_of(name, architecture) for name, p in wrapped.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "mllama"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_vlm_lora_targets_the_language_model_by_default(tiny_models, arch, targets):
    architecture = architecture_for_model(tiny_models[arch])
    model = load_model(tiny_models[arch])
    if not (arch == "qwen2_5_vl" and targets != "all-linear"):  # Qwen's vision tower has no q_proj/v_proj
        # Without scoping, these names (or all-linear) reach into the vision tower / projector as well.
        unscoped = get_peft_model(load_model(tiny_models[arch]), LoraConfig(r=4, target_modules=targets))
        reached = {component_of(n, architecture) for n, _ in unscoped.named_parameters() if "lora_" in n}
        assert reached != {"language_model"}
    assert lora_components(model, architecture, targets) == {"language_model"}


def test_a_regex_overrides_the_language_model_scope(tiny_models):
    architecture = architecture_for_model(tiny_models["qwen2_5_vl"])
    model = load_model(tiny_models["qwen2_5_vl"])
    assert lora_components(model, architecture, r"model\.visual\.blocks\.\d+\.attn\.qkv") == {"vision_tower"}


def test_freezing_components_and_the_table(tiny_models):
    architecture = architecture_for_model(tiny_models["mllama"])
    model = load_model(tiny_models["mllama"])
    freeze(model, architecture, {"vision_tower": True, "projector": True, "language_model": False})
    table = parameter_table(model, architecture)
    assert table["vision_tower"]["trainable"] == 0 < table["vision_tower"]["total"]
    assert table["projector"]["trainable"] == 0 < table["projector"]["total"]
    assert table["language_model"]["trainable"] == table["language_model"]["total"]
    assert table["all"]["total"] == sum(table[c]["total"] for c in ("vision_tower", "projector", "language_model"))
    assert table["all"]["total"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
