"""How the pipelines are wired: typed parameter sections into every node, no output path built by a node or
named by a parameter, and a trainer run identity that follows the data, not its path."""

from __future__ import annotations

import inspect
import itertools
import os
import re
import shutil
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT_ROOT, trainer_run_config
from datasets import Dataset

from vlm_pipeline.config.schema import Section
from vlm_pipeline.datasets import DirectoryDataset, StagingDirectoryDataset
from vlm_pipeline.pipeline_registry import VARIANTS, register_pipelines
from vlm_pipeline.pipelines.run_context.pipeline import MODEL_STAGES
from vlm_pipeline.recipes import RECIPES, slurm_script


def node_parameters(node) -> list[tuple[str, object]]:
    """(dataset name, annotation) of every params: input of a node."""
    hints = typing.get_type_hints(node.func)
    names = list(inspect.signature(node.func).parameters)
    return [
        (dataset, hints.get(arg))
        for dataset, arg in zip(node.inputs, names, strict=False)
        if dataset.startswith("params:")
    ]


def all_nodes():
    return {node.name: node for pipeline in register_pipelines().values() for node in pipeline.nodes}.values()


def test_every_node_parameter_is_a_typed_section():
    untyped = [
        f"{node.name}: {dataset} is {annotation}"
        for node in all_nodes()
        for dataset, annotation in node_parameters(node)
        if not (isinstance(annotation, type) and issubclass(annotation, Section))
    ]
    assert not untyped, untyped


def test_no_node_input_is_a_scalar_the_run_context_carries():
    threaded = {"params:raw_data", "params:base_model", "params:trust_remote_code", "params:model"}
    offenders = [
        (node.name, name)
        for node in all_nodes()
        for name in node.inputs
        if name in threaded and node.name != "build_run_context"
    ]
    assert not offenders, offenders


SHARED_STAGES = ("data_validation", "preprocessing")


def stage_namespace(variant: str, stage: str) -> str:
    """The namespace Kedro-Viz draws a stage's box for: shared stages at the top, model stages in the variant."""
    return stage if stage in SHARED_STAGES else f"{variant}.{stage}"


def dvc_kedro_stages() -> list[tuple[str, str]]:
    """(pipeline, tag) of every dvc.yaml stage that runs ``kedro run --pipelines P --tags T``, foreach expanded."""
    commands = []
    for stage in yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"].values():
        body = stage.get("do", stage)
        for item in stage.get("foreach", [None]):
            words = (body["cmd"] if item is None else body["cmd"].replace("${item}", item)).split()
            if "--tags" in words:
                commands.append((words[words.index("--pipelines") + 1], words[words.index("--tags") + 1]))
    return commands


def test_every_node_lies_in_one_of_the_five_stage_namespaces_of_its_variant():
    pipelines = register_pipelines()
    for variant in VARIANTS:
        staged = [node for node in pipelines[variant].nodes if node.name != "build_run_context"]
        stages = (*SHARED_STAGES, "training", "adapter", "evaluation")
        assert {node.namespace for node in staged} == {stage_namespace(variant, stage) for stage in stages}
        # The box a node is drawn in is the stage its tag runs it in.
        assert [node.name for node in staged if node.tags != {node.namespace.split(".")[-1]}] == []
        # The stage namespaces rename no dataset: only the variant prefixes one, as the catalog names them.
        datasets = [name for name in pipelines[variant].datasets() if not name.startswith("params:")]
        assert {name.split(".")[0] for name in datasets if "." in name} == {variant}
        assert [name for name in datasets if name.count(".") > 1] == []


def test_each_dvc_stage_runs_exactly_the_nodes_of_its_stage_namespace():
    pipelines = register_pipelines()
    commands = dvc_kedro_stages()
    model_stages = [(variant, stage) for variant in VARIANTS for stage in ("training", "adapter", "evaluation")]
    assert sorted(commands) == sorted([("lora", stage) for stage in SHARED_STAGES] + model_stages)
    for pipeline, tag in commands:
        selected = {node.name for node in pipelines[pipeline].only_nodes_with_tags(tag).nodes}
        namespace = stage_namespace(pipeline, tag)
        expected = {node.name for node in pipelines[pipeline].nodes if node.namespace == namespace}
        assert selected == expected | ({"build_run_context"} if tag in MODEL_STAGES else set()), (pipeline, tag)


def test_the_slurm_script_starts_and_stops_at_nodes_that_exist():
    recipe = "a"
    names = re.findall(r"--(?:to|from)-nodes (\S+)", slurm_script(recipe, nodes=2))
    nodes = {node.name for node in register_pipelines()[RECIPES[recipe].pipeline].nodes}
    assert len(names) == 2 and set(names) <= nodes, names


def test_every_directory_a_node_builds_comes_from_a_staging_dataset_of_the_same_path():
    catalog = yaml.safe_load((PROJECT_ROOT / "conf/base/catalog.yml").read_text())
    staging = {name.removesuffix("_staging"): entry for name, entry in catalog.items() if name.endswith("_staging")}
    assert set(staging) == {"{variant}.trained_model", "{variant}.adapter", "{variant}.merged_model"}
    for name, entry in staging.items():
        assert entry["type"].endswith("StagingDirectoryDataset")
        assert entry["path"] == catalog[name]["path"], name  # the same template, so they cannot drift


class Crash(BaseException):
    """An injected crash: a BaseException, so no ``except OSError`` or ``ignore_errors`` in the code swallows it."""


# Every call that moves or deletes a file or folder: a save is checked crashing at each one in turn.
FILESYSTEM_STEPS = ("replace", "rename", "unlink", "remove", "rmdir")


def crashing(step: Callable, calls: Iterator[int], crash_at: int) -> Callable:
    """``step``, counting its calls in the shared ``calls``; the ``crash_at``-th call crashes instead."""

    def counted(*args, **kwargs):
        if next(calls) == crash_at:
            raise Crash
        return step(*args, **kwargs)

    return counted


def folder_contents(folder: Path) -> dict[str, str] | None:
    """{relative path: text} of every file under ``folder``; None when it is absent."""
    if not folder.exists():
        return None
    return {str(path.relative_to(folder)): path.read_text() for path in folder.rglob("*") if path.is_file()}


def write_files(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_a_staged_directory_replaces_its_target_atomically(tmp_path, monkeypatch):
    """A save that crashes at any step leaves the target as the complete old folder or the complete new one."""
    old = {"config.json": '{"old": 1}', "model.safetensors": "old weights", "tokenizer/vocab.txt": "old"}
    new = {"config.json": '{"new": 2}', "model.safetensors": "new weights", "generation_config.json": "{}"}
    for crash_at in itertools.count(1):
        target = tmp_path / f"crash-{crash_at}" / "models/trained"
        target.mkdir(parents=True)
        write_files(target, old)
        staged = StagingDirectoryDataset(path=str(target)).load()
        assert staged.parent == target.parent and staged.name.startswith(".") and not any(staged.iterdir())
        write_files(staged, new)
        calls = itertools.count(1)
        with monkeypatch.context() as patch:
            for name in FILESYSTEM_STEPS:
                patch.setattr(os, name, crashing(getattr(os, name), calls, crash_at))
            try:
                DirectoryDataset(path=str(target), required_files=["config.json"]).save(staged)
            except Crash:
                pass
        assert folder_contents(target) in (old, new), f"a crash at step {crash_at} left {folder_contents(target)}"
        if next(calls) <= crash_at:  # the save ran to its end before the crash point: every step was tried
            break
    assert crash_at > 2  # the old folder moved aside and the new one moved in, at least
    assert folder_contents(target) == new and not staged.exists()
    assert [path.name for path in target.parent.iterdir()] == ["trained"]  # nothing left beside it


def save_rows(rows: list[dict], folder: Path) -> Path:
    Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


@pytest.fixture
def rows() -> list[dict]:
    return [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "image_paths": [], "source_line": 1, "length": 3}]


def test_the_run_identity_follows_the_data_at_the_same_path(tmp_path, rows, tiny_models):
    def identity(data: Path) -> str:
        return trainer_run_config(
            base_model=tiny_models["llama"],
            train_dataset=data,
            image_root=tmp_path,
            output_dir=tmp_path / "out",
            final_dir=tmp_path / "final",
            sft={},
            method={"learning_rate": 1e-3},
        ).identity()

    first = identity(save_rows(rows, tmp_path / "train"))
    shutil.rmtree(tmp_path / "train")
    assert identity(save_rows(rows, tmp_path / "train")) == first  # the same rows saved again: the same run
    shutil.rmtree(tmp_path / "train")
    changed = [{**rows[0], "labels": [-100, -100, 3]}]
    assert identity(save_rows(changed, tmp_path / "train")) != first  # other rows at the same path: a new run
