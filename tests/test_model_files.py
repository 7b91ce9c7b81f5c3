"""Every saved model is checked complete against its base: a tensor cut out of the trained full model, the
passed-through full fine-tune or an adapter stops the stage naming it, and loading such a model fails instead of
filling the tensor at random. (The merged model: ``test_merge.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, run_context
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from vlm_pipeline.architectures import load_model
from vlm_pipeline.model_files import IncompleteModelError, check_saved_model
from vlm_pipeline.pipelines.adapter.nodes import pass_through_full_model
from vlm_pipeline.training.trainer import IncompleteSaveError, check_final_model

CUT = "model.language_model.layers.1.self_attn.q_proj.weight"  # Qwen2.5-VL's module name for it
CUT_ON_DISK = "model.layers.1.self_attn.q_proj.weight"  # ... and the name its checkpoint stores it under


def cut_tensor(folder: Path, file: str, name: str) -> None:
    """Rewrite ``folder/file`` without the tensor ``name``, as a save that lost it would leave it."""
    tensors = load_file(folder / file)
    del tensors[name]
    save_file(tensors, folder / file, metadata={"format": "pt"})


@pytest.fixture
def saved_full_model(tiny_models, tmp_path) -> Path:
    """The tiny Qwen2.5-VL saved again by transformers, as training saves a full fine-tune."""
    saved = tmp_path / "trained"
    load_model(tiny_models["qwen2_5_vl"]).save_pretrained(saved)
    return saved


def test_the_trained_full_model_with_a_tensor_cut_out_stops_training_naming_it(tiny_models, saved_full_model):
    base = tiny_models["qwen2_5_vl"]
    check_final_model(saved_full_model, base, step=3)  # complete: passes
    cut_tensor(saved_full_model, "model.safetensors", CUT_ON_DISK)
    with pytest.raises(IncompleteSaveError, match=rf"after optimizer step 3: .* 1 tensor\(s\) missing: {CUT}$"):
        check_final_model(saved_full_model, base, step=3)
    with pytest.raises(IncompleteModelError, match=rf"1 tensor\(s\) missing from the checkpoint: {CUT}$"):
        load_model(saved_full_model)  # and no stage can load it: evaluation, the merge, the MLflow model


def test_the_full_fine_tune_with_a_tensor_cut_out_does_not_pass_through(tiny_models, saved_full_model, tmp_path):
    base = tiny_models["qwen2_5_vl"]
    context = run_context(base, PROJECT_ROOT / "data/01_raw/shapes_vqa")
    cut_tensor(saved_full_model, "model.safetensors", CUT_ON_DISK)
    (tmp_path / "merged").mkdir()
    with pytest.raises(IncompleteModelError, match=rf"1 tensor\(s\) missing: {CUT}$"):
        pass_through_full_model(context, saved_full_model, tmp_path / "merged")
    assert not any((tmp_path / "merged").iterdir()), "nothing was passed on"


def test_a_sharded_save_in_the_other_key_form_and_dtype_matches_and_an_extra_or_reshaped_tensor_does_not(
    tiny_models, saved_full_model
):
    """The comparison reads every shard of an index, takes Qwen2.5-VL's keys in either form (transformers 4.5x
    saved module names), ignores dtypes, and names tensors the base lacks or holds in another shape."""
    base = tiny_models["qwen2_5_vl"]
    tensors = load_file(saved_full_model / "model.safetensors")
    (saved_full_model / "model.safetensors").unlink()
    module_form = {key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else
                   key.replace("visual.", "model.visual.", 1): t.bfloat16() for key, t in tensors.items()}  # fmt: skip
    names = sorted(module_form)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({key: module_form[key] for key in keys}, saved_full_model / file, metadata={"format": "pt"})
    weight_map = {key: file for file, keys in shards.items() for key in keys}
    (saved_full_model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert check_saved_model(saved_full_model, base) == {"tensors": len(tensors), "matches_base": True}

    second = saved_full_model / "model-00002-of-00002.safetensors"
    extra = {**load_file(second), "model.language_model.layers.1.extra.weight": module_form[names[1]]}
    extra[names[1]] = extra[names[1]][:1]
    save_file(extra, second, metadata={"format": "pt"})
    weight_map["model.language_model.layers.1.extra.weight"] = second.name
    (saved_full_model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(IncompleteModelError) as stopped:
        check_saved_model(saved_full_model, base)
    message = str(stopped.value)
    assert "1 tensor(s) not in the base: model.language_model.layers.1.extra.weight" in message
    assert f"1 tensor(s) of another shape: {names[1]} (1," in message


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llama"])
def test_an_adapter_missing_a_targeted_modules_lora_weight_stops_training_naming_it(arch, tiny_models, tmp_path):
    """An adapter must hold LoRA A and B for each module its target_modules match in the base (a regex over the
    language model, as training passes for a VLM, or a list of names) and each modules_to_save tensor."""
    base = tiny_models[arch]
    targets = r"model\.language_model\.layers\.\d+\.self_attn\.q_proj" if arch == "qwen2_5_vl" else ["q_proj"]
    model = get_peft_model(load_model(base), LoraConfig(r=4, target_modules=targets, modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path / "adapter")
    assert check_saved_model(tmp_path / "adapter", base)["targets_covered"]
    layer = "model.language_model.layers.1" if arch == "qwen2_5_vl" else "model.layers.1"
    for key in (f"{layer}.self_attn.q_proj.lora_B.weight", "lm_head.weight"):
        cut_tensor(tmp_path / "adapter", "adapter_model.safetensors", f"base_model.model.{key}")
        with pytest.raises(IncompleteSaveError, match=rf"does not cover its targets: 1 tensor\(s\) missing: {key}$"):
            check_final_model(tmp_path / "adapter", base, step=1)
        model.save_pretrained(tmp_path / "adapter")  # whole again for the next cut
