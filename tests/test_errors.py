"""Errors first, and short: the mistakes a new user makes stop `kedro run` and `vlm-pipeline` before any node or
model loads, in one or two lines naming the parameter or option, the value and the fix, with no traceback
unless --verbose asks for one."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, copy_project
from PIL import Image

from vlm_pipeline.cli import RunStopped
from vlm_pipeline.commands import InputError, is_input_error, is_own_error, main
from vlm_pipeline.config import ConfigError, check_base_model, check_environment, check_paths, validate_parameters
from vlm_pipeline.data.validation import DataValidationError
from vlm_pipeline.recipes import RECIPES, load_parameters

BIN = Path(sys.executable).parent
SHAPES = PROJECT_ROOT / "data/01_raw/shapes_vqa"


# --- the checks themselves (no Kedro session, no subprocess) --------------------------------------------------


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    """A project folder whose raw data, model and accelerate file exist, as the parameters name them."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw/train.jsonl").write_text("")
    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text("{}")
    (tmp_path / "conf/accelerate").mkdir(parents=True)
    (tmp_path / "conf/accelerate/cpu.yaml").write_text("use_cpu: true\n")
    return {"raw_data": "raw", "base_model": "model", "sft": {"accelerate_config": "conf/accelerate/cpu.yaml"}}


def check(params: dict, root: Path) -> None:
    """The checks of a run that reads the model (a data-validation-only run skips check_base_model)."""
    parsed = validate_parameters(params)
    check_paths(parsed, root)
    check_base_model(parsed.base_model, root)


def test_existing_paths_pass_relative_to_the_project(paths, tmp_path):
    check(paths, tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"raw_data": "nope"}, r"^raw_data: nope does not exist: give the folder holding train\.jsonl"),
        ({"raw_data": "."}, r"^raw_data: \. has no train\.jsonl"),
        ({"base_model": "nope"}, r"^base_model: nope does not exist: .*--params base_model=DIR.*make model"),
        ({"base_model": "raw"}, r"^base_model: raw has no config\.json"),
        (
            {"sft": {"accelerate_config": "conf/accelerate/gpu.yaml"}},
            r"^sft\.accelerate_config: conf/accelerate/gpu\.yaml does not exist: use a file of conf/accelerate/ "
            r"\(cpu\.yaml\)",
        ),
    ],
)
def test_a_missing_path_is_one_line_naming_the_parameter_the_path_and_the_fix(paths, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as error:
        check({**paths, **override}, tmp_path)
    assert "\n" not in str(error.value)


def test_a_missing_chat_template_is_named_with_the_fix(paths, tmp_path):
    with pytest.raises(ConfigError, match=r"preprocessing\.chat_template: nope\.jinja does not exist: give a \.jinja"):
        check({**paths, "preprocessing": {"chat_template": "nope.jinja"}}, tmp_path)


def test_a_missing_environment_lists_the_ones_there_are(tmp_path):
    for env in ("base", "gpu_recipe"):
        (tmp_path / env).mkdir()
        (tmp_path / env / "parameters.yml").write_text("{}")
    (tmp_path / "accelerate").mkdir()  # configuration of another kind: not an environment
    (tmp_path / "accelerate/cpu.yaml").write_text("use_cpu: true\n")
    check_environment(tmp_path, "gpu_recipe")
    check_environment(tmp_path, None)  # Kedro's default environment
    with pytest.raises(ConfigError) as error:
        check_environment(tmp_path, "gpu_recipie")
    assert str(error.value) == (
        f"conf environment 'gpu_recipie' does not exist: {tmp_path.name}/gpu_recipie; available: base, gpu_recipe"
    )


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_environment_stops_until_its_own_paths_are_given(name, monkeypatch):
    """A recipe's conf leaves raw_data and base_model as <...> placeholders: `kedro run --env` stops in the pre-run
    checks naming the one to set (the hook runs these two checks), instead of training an 11B model on the demo."""
    monkeypatch.chdir(PROJECT_ROOT)
    params = validate_parameters(load_parameters(RECIPES[name].env))
    with pytest.raises(ConfigError, match=r"^raw_data is the placeholder <.+>: set it .*--params raw_data=DIR"):
        check_paths(params, PROJECT_ROOT)
    given = validate_parameters(load_parameters(RECIPES[name].env, {"raw_data": str(SHAPES)}))
    check_paths(given, PROJECT_ROOT)  # the demo's data, given on purpose, passes
    with pytest.raises(ConfigError, match=r"^base_model is the placeholder <.+>: set it .*--params base_model=DIR"):
        check_base_model(given.base_model, PROJECT_ROOT)


def test_trl_names_kept_elsewhere_say_where_and_are_not_called_old():
    with pytest.raises(ConfigError) as error:
        validate_parameters({"raw_data": "r", "base_model": "m", "sft": {"learning_rate": 1e-4}})
    message = str(error.value)
    assert message.startswith("sft.learning_rate is TRL's name, but here each method has its own")
    assert "lora.method.learning_rate" in message and "full_ft.method.learning_rate" in message
    assert "old" not in message
    with pytest.raises(ConfigError, match=r"^sft: max_seq_length is an older name: use preprocessing\.max_length"):
        validate_parameters({"raw_data": "r", "base_model": "m", "sft": {"max_seq_length": 512}})


def test_our_errors_are_told_apart_from_bugs():
    assert is_own_error(ConfigError("x")) and is_own_error(DataValidationError("x")) and is_own_error(InputError("x"))
    assert not is_own_error(ValueError("x")) and not is_own_error(KeyError("x"))
    assert is_input_error(ConfigError("x")) and is_input_error(InputError("x"))
    assert not is_input_error(DataValidationError("x"))
    assert RunStopped(ConfigError("x")).exit_code == 2 and RunStopped(DataValidationError("x")).exit_code == 1
    assert RunStopped(ConfigError("bad key")).message == "ConfigError: bad key"


# --- vlm-pipeline, in process --------------------------------------------------------------------------------


def vlm_pipeline(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A folder that looks like a saved model to the input checks; nothing is ever loaded from it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return folder


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--image", "nowhere.png"], "error: --image nowhere.png does not exist (or is not a file)\n"),
        (["--image", "{bad}"], "error: --image {bad} is not a readable image: cannot identify image file"),
        (["--adapter", "{model}", "--image", "{good}"], "error: --adapter {model} has no adapter_config.json"),
    ],
)
def test_predict_checks_its_inputs_in_one_line(capsys, tmp_path, model_dir, arguments, message):
    (tmp_path / "bad.png").write_text("not an image")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    names = {"bad": tmp_path / "bad.png", "good": tmp_path / "good.png", "model": model_dir}
    arguments = [argument.format(**names) for argument in arguments]
    code, err = vlm_pipeline(capsys, "predict", "--model", str(model_dir), *arguments, "--prompt", "Colour?")
    assert code == 2 and err.startswith(message.format(**names)) and err.count("\n") == 1


def test_predict_names_a_missing_model(capsys, tmp_path):
    code, err = vlm_pipeline(capsys, "predict", "--model", str(tmp_path / "nowhere"), "--prompt", "Hi")
    assert (code, err) == (2, f"error: --model {tmp_path / 'nowhere'} does not exist (or is not a folder)\n")


def test_validate_and_plan_check_their_inputs(capsys, tmp_path, monkeypatch):
    code, err = vlm_pipeline(
        capsys, "validate", str(tmp_path / "x.jsonl"), "--image-root", str(tmp_path), "--output-dir", str(tmp_path)
    )
    assert (code, err) == (2, f"error: input {tmp_path / 'x.jsonl'} does not exist (or is not a file)\n")
    monkeypatch.chdir(PROJECT_ROOT)
    code, err = vlm_pipeline(capsys, "plan", "--env", "tiny_lama", "--records", "10")
    assert code == 2 and err.startswith(
        "error: conf environment 'tiny_lama' does not exist: conf/tiny_lama; available:"
    )
    assert "tiny_llama" in err and "accelerate" not in err
    code, err = vlm_pipeline(capsys, "plan", "--env", "llama_vision_lora", "--records", "10")
    assert code == 2 and err.count("\n") == 1, err
    assert "placeholder" in err and "--recipe b" in err and "--model-config DIR" in err
    # Under DVC, params.yaml's defaults (the demo's) would fill a recipe's placeholder: the parameters stage stops.
    argv = ["--env", "llama_vision_lora", "--base-model", "/m", "--raw-data", "data/01_raw/shapes_vqa"]
    code, err = vlm_pipeline(capsys, "parameters", *argv, "--out", str(tmp_path / "parameters.yml"))
    assert code == 2 and "leaves raw_data to you" in err and "dvc exp run -S raw_data=DIR" in err


def test_understood_library_noise_is_hidden_and_nothing_else(caplog):
    """bitsandbytes' note about an optional kernel from the Hub (every `vlm-pipeline predict` on an AVX512-BF16 CPU)
    and FastAPI's deprecation of a class kedro-viz subclasses (`kedro viz build`): hidden by text and source."""
    import logging
    import warnings

    from vlm_pipeline.warning_filters import hide_understood_warnings

    bitsandbytes = logging.getLogger("bitsandbytes.backends.cpu.ops")
    hide_understood_warnings()
    try:
        with caplog.at_level(logging.WARNING, bitsandbytes.name), warnings.catch_warnings(record=True) as raised:
            bitsandbytes.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module")
            bitsandbytes.warning("some other bitsandbytes warning")
            for module in ("kedro_viz.api.rest.responses.pipelines", "some_package.responses"):
                warnings.warn_explicit("ORJSONResponse is deprecated, FastAPI now ...", UserWarning, "x.py", 1, module)
        assert [record.getMessage() for record in caplog.records] == ["some other bitsandbytes warning"]
        assert [str(warning.message) for warning in raised] == ["ORJSONResponse is deprecated, FastAPI now ..."]
    finally:
        logging.captureWarnings(False)
        bitsandbytes.filters.clear()
        logging.getLogger("py.warnings").filters.clear()


def test_verbose_shows_the_traceback(tmp_path, model_dir):
    argv = ["predict", "--model", str(model_dir), "--image", str(tmp_path / "no.png"), "--prompt", "Hi", "--verbose"]
    with pytest.raises(InputError, match="--image .* does not exist"):
        main(argv)


# --- the real commands -----------------------------------------------------------------------------------------


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A command as a user types it, with its own MLflow store; stdout and stderr together."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def kedro_project(tmp_path_factory) -> Path:
    """One project copy for the mistakes below (each stops before anything is written), with a stand-in for the
    default model folder: only its config.json is looked at before the run stops."""
    project = copy_project(tmp_path_factory.mktemp("errors") / "project")
    model = project / "data/00_base_models/tiny-qwen2_5_vl"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return project


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--env", "nope"],
            "ConfigError: conf environment 'nope' does not exist: conf/nope; available: base, llama_text_lora,",
        ),
        (
            ["--params", "sft.learning_rate=1e-4"],
            "ConfigError: sft.learning_rate is TRL's name, but here each method has its own: set "
            "lora.method.learning_rate",
        ),
        (
            ["--params", "raw_data=data/01_raw/nowhere"],
            "ConfigError: raw_data: data/01_raw/nowhere does not exist: give the folder holding train.jsonl",
        ),
        (
            ["--params", "sft.accelerate_config=conf/accelerate/gpus.yaml"],
            "ConfigError: sft.accelerate_config: conf/accelerate/gpus.yaml does not exist: use a file of "
            "conf/accelerate/",
        ),
        (
            ["--params", "preprocessing.chat_template=conf/nowhere.jinja"],
            "ConfigError: preprocessing.chat_template: conf/nowhere.jinja does not exist: give a .jinja file",
        ),
    ],
    ids=["env", "learning_rate", "raw_data", "accelerate_config", "chat_template"],
)
def test_kedro_run_stops_before_any_node_in_two_lines(kedro_project, arguments, message):
    project = kedro_project
    result = run([str(BIN / "kedro"), "run", *arguments], project)
    assert result.returncode == 2, result.stdout[-3000:]
    assert f"{message}" in result.stdout and "Traceback" not in result.stdout, result.stdout[-3000:]
    # Everything kedro printed: the error and the hint (no library warning at start-up: warning_filters.py).
    assert result.stdout.strip().splitlines()[1:] == ["Run with --verbose to see the full exception"], result.stdout
    assert not (project / "data/02_intermediate").exists(), "no node ran"
    assert not (project / "mlflow.db").exists(), "MLflow was never opened"


@pytest.fixture
def read_only_data(tmp_path):
    """Twelve shapes records whose images are data: URIs (every other one) or files, in a folder nobody may write,
    as a dataset mount on a GPU host often is. Made writable again at teardown, so pytest can remove it."""
    from vlm_pipeline.data.dialects import to_openai_base64, to_openai_path

    data = tmp_path / "mount"
    (data / "images").mkdir(parents=True)
    for split, count in (("train", 12), ("test", 4)):
        records = [json.loads(raw) for raw in (SHAPES / f"{split}.jsonl").read_text().splitlines()[:count]]
        rows = [(to_openai_base64 if i % 2 else to_openai_path)(record, SHAPES) for i, record in enumerate(records)]
        for record in records:
            (data / record["images"][0]).write_bytes((SHAPES / record["images"][0]).read_bytes())
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    folders = [data, data / "images"]
    for path in [*data.rglob("*"), data]:
        path.chmod(path.stat().st_mode & ~0o222)
    yield data
    for folder in folders:
        folder.chmod(folder.stat().st_mode | 0o200)


@pytest.mark.slow
def test_a_data_validation_run_needs_no_model_and_only_reads_the_data_folder(tmp_path, read_only_data):
    """`kedro run --tags data_validation` on a read-only folder of data: URIs, with no model: the decoded images go to
    the pipeline's own data area, by content hash. A stage that reads the model still stops before anything runs."""
    project = copy_project(tmp_path / "project")
    before = sorted((path.relative_to(read_only_data), path.stat().st_mtime_ns) for path in read_only_data.rglob("*"))
    params = f"raw_data={read_only_data},base_model=/nowhere/model"
    validated = run([str(BIN / "kedro"), "run", "--tags", "data_validation", "--params", params], project)
    assert validated.returncode == 0, validated.stdout[-3000:]
    assert sorted((p.relative_to(read_only_data), p.stat().st_mtime_ns) for p in read_only_data.rglob("*")) == before
    # (As root the folder's mode stops nothing: its unchanged listing is the proof that nothing was written.)
    decoded = 0
    for split in ("train", "test"):
        sources = (SHAPES / f"{split}.jsonl").read_text().splitlines()
        for row in (project / f"data/02_intermediate/{split}/valid.jsonl").read_text().splitlines():
            record = json.loads(row)
            (path,) = record["images"]  # from the project folder, the run context's image root
            original = (SHAPES / json.loads(sources[record["source_line"] - 1])["images"][0]).read_bytes()
            assert (project / path).read_bytes() == original
            assert record["image_sha256"] == [hashlib.sha256(original).hexdigest()]
            if record["source_line"] % 2 == 0:  # a data: URI, stored by content hash in the pipeline's area
                assert path == f"data/02_intermediate/images/{record['image_sha256'][0]}.png"
                decoded += 1
            else:
                assert path == f"{read_only_data}/{json.loads(sources[record['source_line'] - 1])['images'][0]}"
    assert decoded == 8

    # Preprocessing reads the model: the missing folder stops it in one line, before the MLflow run starts.
    runs_before = mlflow_runs(project)
    stopped = run([str(BIN / "kedro"), "run", "--tags", "preprocessing", "--params", params], project)
    assert stopped.returncode == 2, stopped.stdout[-3000:]
    assert "ConfigError: base_model: /nowhere/model does not exist: point it at a local checkpoint folder" in (
        stopped.stdout
    )
    assert stopped.stdout.strip().splitlines()[1:] == ["Run with --verbose to see the full exception"], stopped.stdout
    assert not (project / "data/03_primary").exists(), "no node ran"
    assert mlflow_runs(project) == runs_before, "no MLflow run was started"


@pytest.mark.slow
def test_packing_a_family_that_cannot_pack_stops_before_the_run(kedro_project, tmp_path):
    """sft.padding_free true on Llama-3.2-Vision: one line naming the alternative, from config.json alone, before
    the MLflow run starts; left unset, the same model is simply not packed (Architecture.padding_free)."""
    model = tmp_path / "llama-3.2-vision"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    runs_before = mlflow_runs(kedro_project) if (kedro_project / "mlflow.db").exists() else 0
    params = f"base_model={model},sft.padding_free=true"
    stopped = run([str(BIN / "kedro"), "run", "--tags", "preprocessing", "--params", params], kedro_project)
    assert stopped.returncode == 2, stopped.stdout[-3000:]
    assert (
        "ConfigError: sft.padding_free: mllama records cannot be packed into one row (its images enter through "
        "cross-attention); leave it unset, and set sft.max_tokens_per_batch" in stopped.stdout
    ), stopped.stdout[-3000:]
    assert stopped.stdout.strip().splitlines()[1:] == ["Run with --verbose to see the full exception"], stopped.stdout
    assert not (kedro_project / "data/03_primary").exists(), "no node ran"
    if (kedro_project / "mlflow.db").exists():
        assert mlflow_runs(kedro_project) == runs_before, "no MLflow run was started"


def test_each_family_packs_by_default_where_it_can():
    from vlm_pipeline.architectures import get_architecture

    assert get_architecture("qwen2_5_vl").padding_free(None) and get_architecture("llama").padding_free(None)
    assert not get_architecture("mllama").padding_free(None) and not get_architecture("mllama").padding_free(False)
    assert not get_architecture("qwen2_5_vl").padding_free(False)
    with pytest.raises(ConfigError, match="mllama records cannot be packed"):
        get_architecture("mllama").padding_free(True)


def mlflow_runs(project: Path) -> int:
    with sqlite3.connect(project / "mlflow.db") as store:
        (count,) = store.execute("SELECT count(*) FROM runs").fetchone()
    return count


@pytest.mark.slow
def test_kedro_run_verbose_keeps_the_traceback(kedro_project):
    result = run([str(BIN / "kedro"), "run", "--env", "nope", "--verbose"], kedro_project)
    assert result.returncode != 0 and "Traceback" in result.stdout
    assert "conf environment 'nope' does not exist" in result.stdout


@pytest.mark.slow
def test_a_misspelt_pipeline_is_one_line_listing_the_registered_ones(kedro_project):
    result = run([str(BIN / "kedro"), "run", "--pipelines", "loraa"], kedro_project)
    assert result.returncode == 2, result.stdout[-3000:]
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith("no pipeline named 'loraa'; registered: ") and "lora" in line.split(": ", 1)[1]


@pytest.mark.slow
def test_predict_checks_the_image_before_importing_torch(tmp_path, model_dir):
    """The model (and torch with it) is loaded only once every input has passed: a typo costs a second."""
    script = (
        "import sys\nfrom vlm_pipeline.commands import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit as exit:\n    print('torch' in sys.modules, exit.code)\n"
    )
    argv = ["predict", "--model", str(model_dir), "--image", str(tmp_path / "no.png"), "--prompt", "Hi"]
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert result.stdout == "False 2\n" and "Traceback" not in result.stderr
    assert result.stderr == f"error: --image {tmp_path / 'no.png'} does not exist (or is not a file)\n"


@pytest.mark.slow
def test_a_symlinked_images_folder_validates(tmp_path):
    """GPU hosts keep images on a big volume: images/ linked from the data folder is read, not quarantined."""
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "images").symlink_to(SHAPES / "images", target_is_directory=True)
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(volume / "images", target_is_directory=True)  # a link to a link, as on some hosts
    lines = (SHAPES / "test.jsonl").read_text().splitlines()[:10]
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    command = [str(BIN / "vlm-pipeline"), "validate", str(data / "test.jsonl"), "--image-root", str(data)]
    result = run([*command, "--output-dir", str(tmp_path / "out")], tmp_path)
    assert result.returncode == 0, result.stdout
    assert "10 valid, 0 quarantined of 10" in result.stdout
