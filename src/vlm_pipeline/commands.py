"""``vlm-pipeline``: commands that work outside a Kedro run (the pipelines call the same functions).

Not named ``cli.py``: Kedro imports ``<package>.cli`` as its own CLI extension. ``DESCRIPTION`` is what
``vlm-pipeline --help`` says; each command's own help is written where its parser is built (``build_parser``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlm_pipeline.architectures import Architecture

DESCRIPTION = """Commands that work outside a Kedro run: build a tiny model, validate or import data, plan a run,
print a recipe's command, answer one prompt, show which tokens train. `vlm-pipeline COMMAND --help` says more.

Every command checks the files it is given before it loads a model. A mistake (a missing file, an unreadable image,
a bad parameter) is one line, `error: ...`, with exit status 2; any other error of vlm-pipeline's own (too many
rejected records, a plan over budget) is one line with exit status 1. --verbose shows the traceback."""
DEFAULT_MAX_INVALID_FRACTION = 0.05  # same default as conf/base/parameters_data_validation.yml
DEFAULT_MAX_IMAGE_PIXELS = 12845056
PACKAGE = __name__.partition(".")[0]


class InputError(ValueError):
    """A file or folder given on the command line is missing or unreadable: the user's to fix, so one line."""


def is_own_error(error: BaseException) -> bool:
    """Errors vlm-pipeline raises on purpose (ConfigError, DataValidationError, PlanError, TrainingLaunchError, ...)
    carry a message written for the user; anything else is a bug, whose traceback is the useful part."""
    return type(error).__module__.partition(".")[0] == PACKAGE


def is_input_error(error: BaseException) -> bool:
    """A mistake in what was given (a path, a parameter), as opposed to a run that failed: exit status 2."""
    from vlm_pipeline.config.schema import ConfigError

    return isinstance(error, InputError | ConfigError)


def _file(path: str, option: str) -> Path:
    """``path`` as an existing file; InputError naming the option otherwise."""
    if not Path(path).is_file():
        raise InputError(f"{option} {path} does not exist (or is not a file)")
    return Path(path)


def _folder(path: str, option: str) -> Path:
    """``path`` as an existing folder; InputError naming the option otherwise."""
    if not Path(path).is_dir():
        raise InputError(f"{option} {path} does not exist (or is not a folder)")
    return Path(path)


def _checkpoint(path: str, option: str, marker: str = "config.json", kind: str = "model") -> Path:
    """A saved model (or adapter) folder, judged by its ``marker`` file before anything heavy is imported."""
    folder = _folder(path, option)
    if not (folder / marker).is_file():
        raise InputError(f"{option} {path} has no {marker}: is it a saved {kind} folder?")
    return folder


def _image(path: str, option: str = "--image") -> Path:
    """An image file that decodes, checked before the model loads (a minute on a large checkpoint)."""
    from PIL import Image

    image = _file(path, option)
    try:
        with Image.open(image) as opened:
            opened.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{option} {path} is not a readable image: {error}") from None
    return image


def _environment(env: str) -> None:
    """``--env`` must be a folder of conf/, as ``kedro run --env`` requires."""
    from vlm_pipeline.config import check_environment

    check_environment(Path("conf"), env)


def _architecture(name: str) -> Architecture:
    """``--arch``: the registered family of that name. The registry (torch, transformers) is imported only when a
    command that takes ``--arch`` is parsed, so the other commands start without it."""
    from vlm_pipeline.architectures import get_architecture

    try:
        return get_architecture(name)
    except ValueError as error:  # argparse prints it as a usage error: "unknown architecture ...; expected one of"
        raise argparse.ArgumentTypeError(str(error)) from None


def _tiny_model(args: argparse.Namespace) -> int:
    from vlm_pipeline.library_bars import hide_library_bars_in_logs

    hide_library_bars_in_logs()  # `dvc repro`'s first stage: the weights-writing bar
    out = args.arch.build_tiny(Path(args.out), args.seed)
    print(f"Built tiny {args.arch.name} model in {out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    _file(args.input, "input")
    _folder(args.image_root, "--image-root")
    if args.model:
        _checkpoint(args.model, "--model")
    from vlm_pipeline.data.validation import DataValidationError, check_reject_budget, validate_lines
    from vlm_pipeline.datasets import JSONDataset, JSONLinesDataset, RawLinesDataset

    lines = list(RawLinesDataset(args.input).load())  # the --model check quotes lines by number
    out = Path(args.output_dir)
    result = validate_lines(  # decoded data: URI images go to OUT/images: the image folder is only read
        lines,
        Path(args.image_root),
        max_image_pixels=args.max_image_pixels,
        duplicates=args.duplicates,
        image_store=out,
    )
    if args.model:
        _quarantine_too_long(result, lines, args)
    JSONLinesDataset(str(out / "valid.jsonl")).save(result.valid)
    JSONLinesDataset(str(out / "quarantine.jsonl")).save(result.quarantine)
    JSONDataset(str(out / "report.json")).save(result.report)
    report = result.report
    # Compiler-style lines (FILE:LINE: reason: detail) for the first problems, so a person knows where to look.
    for entry in result.quarantine[: args.show]:
        print(f"{args.input}:{entry['line']}: {entry['reason']}: {entry['detail']}", file=sys.stderr)
    if len(result.quarantine) > args.show:
        print(f"... and {len(result.quarantine) - args.show} more in {out / 'quarantine.jsonl'}", file=sys.stderr)
    try:
        check_reject_budget(report, args.max_invalid_fraction, source=args.input)
    except DataValidationError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"{args.input}: {report['valid']} valid, {report['quarantined']} quarantined of {report['total']} → {out}")
    return 0


def _quarantine_too_long(result, lines: list[bytes], args: argparse.Namespace) -> None:
    """Encode each valid record with the model's real processor and chat template (image tokens included); move
    the ones over ``--max-length`` (``too_long``) or with no label token to the quarantine, as preprocessing would."""
    from vlm_pipeline.architectures import load_chat_encoder
    from vlm_pipeline.config.schema import PreprocessingParams
    from vlm_pipeline.data.encoding import encode_record

    encoder = load_chat_encoder(args.model, PreprocessingParams())
    kept = []
    for record in result.valid:
        row = encode_record(
            encoder,
            record,
            Path(args.image_root),
            max_length=args.max_length,
            train_on="all_assistant_turns",
            truncate_text_only=False,
        )
        if row["reason"] is None:
            kept.append(record)
            continue
        raw = lines[record["source_line"] - 1].decode("utf-8", errors="replace")
        result.quarantine.append(
            {"line": record["source_line"], "reason": row["reason"], "detail": row["detail"], "raw": raw}
        )
        result.report["reasons"][row["reason"]] = result.report["reasons"].get(row["reason"], 0) + 1
    moved = len(result.valid) - len(kept)
    result.valid[:] = kept
    result.quarantine.sort(key=lambda entry: entry["line"])
    result.report["valid"] -= moved
    result.report["quarantined"] += moved


def _metrics(args: argparse.Namespace) -> int:
    from vlm_pipeline.datasets import JSONDataset
    from vlm_pipeline.reporting.evaluation import format_table

    path = Path(args.path)
    if not path.is_file():
        print(f"error: {path} does not exist: run the pipeline first (make run, kedro run, dvc repro)", file=sys.stderr)
        return 2
    # metrics.json holds the headline only; every number is beside it (a file of an older run holds them itself).
    numbers = path.parent / "detailed_metrics.json"
    metrics = JSONDataset(str(numbers if numbers.is_file() else path)).load()
    # The strings beside metrics.json's numbers (majority answer, merge check wording), where the run wrote them.
    details = path.parent / "evaluation_details.json"
    print(format_table(metrics, JSONDataset(str(details)).load() if details.is_file() else None))
    # The other evaluation outputs of the same variant (conf/base/catalog.yml puts them there).
    variant = path.parent.name
    outputs = [
        details,
        path.parent / "report.md",
        path.parent / "loss_curve.png",
        path.parent / "base_vs_tuned.png",
        path.parents[2] / "07_model_output" / variant / "predictions.jsonl",
    ]
    print("also: " + ", ".join(str(output) for output in outputs if output.is_file()))
    return 0


def _recipe(args: argparse.Namespace) -> int:
    """Print a seed recipe's command; with --cpu-smoke, run it on a tiny model of its architecture here."""
    import subprocess

    from vlm_pipeline.recipes import RECIPES, as_cli_params, cpu_smoke_params, run_command

    recipe = RECIPES[args.name]
    command = ["kedro", "run", "--pipelines", recipe.pipeline, "--env", recipe.env]
    if args.nodes:
        from vlm_pipeline.recipes import slurm_script

        print(slurm_script(args.name, args.nodes), end="")
        return 0
    if not args.cpu_smoke:
        print(
            f"({args.name}) {recipe.summary}\n  {run_command(recipe)}\n"
            "  replace each <...>: base_model is the checkpoint folder, raw_data the folder of train.jsonl, "
            "test.jsonl and their images"
        )
        return 0
    tiny = Path("data/00_base_models") / f"tiny-{recipe.architecture}"
    if not (tiny / "config.json").is_file():
        from vlm_pipeline.architectures import get_architecture  # the model libraries: only to build a model

        get_architecture(recipe.architecture).build_tiny(tiny, 0)
    command = [str(Path(sys.executable).parent / "kedro"), *command[1:]]
    command += ["--params", as_cli_params(cpu_smoke_params(recipe, str(tiny)))]
    print(" ".join(command), flush=True)
    return subprocess.call(command)


def _parameters(args: argparse.Namespace) -> int:
    """The parameters a run of ``--env`` gets (conf/base, the environment, the two paths, schema defaults), validated,
    written as YAML: what DVC tracks per stage (dvc.yaml's ``parameters`` stage)."""
    import yaml

    from vlm_pipeline.atomic import write_bytes_atomic
    from vlm_pipeline.config import validate_parameters
    from vlm_pipeline.config.checks import is_placeholder
    from vlm_pipeline.config.run import file_sha256
    from vlm_pipeline.recipes import load_parameters

    _environment(args.env)
    paths = {"base_model": args.base_model, "raw_data": args.raw_data}
    own = Path("conf") / args.env / "globals.yml"
    own_globals = (yaml.safe_load(own.read_text()) if args.env != "base" and own.is_file() else None) or {}
    demo = load_parameters("base")
    for key, value in paths.items():
        if is_placeholder(own_globals.get(key, "")) and Path(value).resolve() == Path(demo[key]).resolve():
            # params.yaml's defaults are the demo's: a recipe environment would train on the demo's data
            raise InputError(
                f"conf/{args.env}/globals.yml leaves {key} to you ({own_globals[key]}), but this run was given "
                f"the demo's {value}: set it (dvc exp run -S {key}=DIR)"
            )
        if key in own_globals and str(own_globals[key]) != value and not is_placeholder(own_globals[key]):
            print(
                f"warning: conf/{args.env}/globals.yml has {key}: {own_globals[key]}; this run uses {value}",
                file=sys.stderr,
            )
    params = validate_parameters(load_parameters(args.env, paths)).model_dump(mode="json")
    # DVC tracks this file's keys, not the files they name: the template's digest turns an edit to the file into a
    # changed `preprocessing` key, which every stage that renders the template tracks.
    template = params["preprocessing"]["chat_template"]
    params["preprocessing"]["chat_template_sha256"] = file_sha256(Path(template)) if template else None
    if template and not Path(template).resolve().is_relative_to(Path("conf").resolve()):
        print(
            f"warning: preprocessing.chat_template {template} is outside conf/: this stage depends on conf/ "
            "(dvc.yaml), so `dvc repro` does not see an edit to the file; keep templates under conf/",
            file=sys.stderr,
        )
    write_bytes_atomic(Path(args.out), yaml.safe_dump(params, sort_keys=False).encode())
    return 0


def _plan(args: argparse.Namespace) -> int:
    """The preflight plan of a run from conf/ (as `kedro run --env ENV` reads it), without loading any weights.

    Token lengths are measured only on data preprocessed from the run's own ``raw_data``; otherwise (a recipe's
    placeholder, another folder's data, ``--records``) every row is the recipe's stated worst case, and the first
    line says which it is."""
    from vlm_pipeline.config import validate_parameters
    from vlm_pipeline.recipes import RECIPES, load_parameters

    recipe = RECIPES[args.recipe] if args.recipe else None
    env = recipe.env if recipe else args.env
    variant = recipe.pipeline if recipe else args.pipeline
    _environment(env)
    params = validate_parameters(load_parameters(env, {"raw_data": args.raw_data} if args.raw_data else None))
    if args.model_config or recipe:
        model_config = _checkpoint(args.model_config or recipe.model_config, "--model-config")
    else:
        model_config = _base_model_config(env, params.base_model)
    from vlm_pipeline.planning.plan import build_plan
    from vlm_pipeline.reporting.tables import format_plan

    measured, source = _measured_data(env, params.raw_data)
    if args.records is not None:
        data, source = {"records": args.records}, f"--records {args.records:,} given"
    elif measured is not None:
        data = measured
    else:
        raise InputError(
            f"{source}: give --records N (training records after the validation hold-out) to plan every row at "
            "its stated worst case, or --raw-data DIR once that folder has been preprocessed"
        )
    plan = build_plan(
        model_dir=model_config,
        sft=params.sft,
        method=getattr(params, variant).method,
        images=params.preprocessing.images.model_dump(),
        **data,
        max_length=params.preprocessing.max_length,
        gpu_memory_gb=args.gpu_memory_gb if args.gpu_memory_gb is not None else params.plan.gpu_memory_gb,
        trust_remote_code=params.model.trust_remote_code,
        load_dtype=params.model.dtype,
    )
    run = (f"recipe ({args.recipe}), " if recipe else "") + f"--env {env}, pipeline {variant}"
    if "lengths" not in data:
        images = " and one image at preprocessing.images' largest size" if plan["settings"]["images_per_row"] else ""
        source = (
            f"no data of yours measured ({source}): every row planned at max_length "
            f"{params.preprocessing.max_length} tokens{images}, the worst case"
        )
    print(f"plan: {run}; {source}\n{format_plan(plan)}")
    return 0 if plan["fits"] is not False else 1


def _base_model_config(env: str, base_model: str) -> Path:
    """``base_model``'s folder as the model the plan reads; a placeholder or a missing folder names the options
    that plan without it."""
    from vlm_pipeline.config.checks import is_placeholder
    from vlm_pipeline.recipes import RECIPES

    seeds = [f"--recipe {name}" for name, recipe in RECIPES.items() if recipe.env == env]
    instead = f"plan with {seeds[0]} (its model's published config) or" if seeds else "give"
    if is_placeholder(base_model):
        raise InputError(
            f"base_model is conf/{env}'s placeholder {base_model}: {instead} --model-config DIR (a folder with the "
            "model's config.json)"
        )
    try:
        return _checkpoint(base_model, "base_model")
    except InputError as error:
        raise InputError(f"{error}; or {instead} --model-config DIR") from None


def _measured_data(env: str, raw_data: str) -> tuple[dict | None, str]:
    """The preprocessed training split's size and token lengths if it was made from ``raw_data`` (the validation
    summary names the folder it read), and what was measured; None and why not otherwise."""
    import json

    from vlm_pipeline.config.checks import is_placeholder
    from vlm_pipeline.planning.plan import training_data
    from vlm_pipeline.recipes import load_config

    if is_placeholder(raw_data):
        return None, f"raw_data is the placeholder {raw_data}"
    catalog = load_config(env, "catalog", {"raw_data": raw_data})
    train = Path(catalog["{split}_tokenized@arrow"]["path"].format(split="train"))
    summary = Path(catalog["validation_summary"]["filepath"])
    if not (train / "dataset_info.json").is_file() or not summary.is_file():
        return None, f"{train} does not exist (no preprocessed data yet)"
    source = json.loads(summary.read_text(encoding="utf-8")).get("raw_data")
    if source is None or Path(source).resolve() != Path(raw_data).resolve():
        return None, f"{train} was preprocessed from {source}, not from raw_data {raw_data}"
    from datasets import load_from_disk

    return training_data(load_from_disk(str(train))), f"lengths measured on {train} (preprocessed from {source})"


def _video(path: str) -> dict:
    """A clip (or a folder of frames) that decodes: its ``video_info`` as validation reads it, before the model
    loads."""
    from vlm_pipeline.config.schema import DataValidationParams
    from vlm_pipeline.data.formats import RecordError
    from vlm_pipeline.data.video_refs import VideoChecker

    video = Path(path).resolve()
    if not video.exists():
        raise InputError(f"--video {path} does not exist")
    defaults = DataValidationParams()
    checker = VideoChecker(
        video.parent,
        max_seconds=defaults.max_video_seconds,
        max_frame_pixels=defaults.max_image_pixels,
        frame_folder_fps=defaults.frame_folder_fps,
    )
    try:
        checked = checker(video.name)
    except RecordError as error:
        raise InputError(f"--video {path}: {error.detail}") from None
    width, height = checked.size
    return {"frames": checked.frames, "fps": checked.fps, "seconds": checked.seconds, "width": width, "height": height}


def _predict(args: argparse.Namespace) -> int:
    """One greedy answer from a model (or base + LoRA adapter), through the evaluation stage's own generation (a
    video's frames sampled as the model's run sampled them: the fps and frame limits its folder's video processor
    holds)."""
    _checkpoint(args.model, "--model")
    if args.adapter:
        _checkpoint(args.adapter, "--adapter", marker="adapter_config.json", kind="LoRA adapter")
    if args.image and args.video:
        raise InputError("give --image or --video, not both")
    if args.image:
        _image(args.image)
    video_info = _video(args.video) if args.video else None
    from vlm_pipeline.architectures import architecture_for_model, load_chat_encoder, load_model
    from vlm_pipeline.config.schema import PreprocessingParams
    from vlm_pipeline.data.video_sampling import saved_sampling
    from vlm_pipeline.scoring import generate_answers

    try:
        architecture = architecture_for_model(args.model)
    except ValueError as error:  # a model_type vlm-pipeline has no family for
        raise InputError(f"--model {error}") from None
    media = "--image" if args.image else "--video" if args.video else None
    if media and not architecture.is_vision:
        raise InputError(f"{args.model} is a text-only model: drop {media}")
    if args.video and architecture.video_inputs is None:
        raise InputError(f"{args.model} ({architecture.name}) reads no video: give --image PATH")
    if architecture.is_vision and not media:
        raise InputError(f"{args.model} is a vision model: give --image PATH (or --video for Qwen2.5-VL)")
    from vlm_pipeline.library_bars import hide_library_bars_in_logs

    hide_library_bars_in_logs()  # transformers' weight-loading bar, outside a terminal
    model = load_model(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    given = Path(args.image or args.video).resolve() if media else None
    part = {"type": "image" if args.image else "video"}
    content = [part, {"type": "text", "text": args.prompt}] if given else args.prompt
    record = {
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": ""}],
        "images": [given.name] if args.image else [],
        **({"videos": [given.name], "video_info": [video_info]} if args.video else {}),
    }
    preprocessing = PreprocessingParams(videos=saved_sampling(args.model)) if args.video else PreprocessingParams()
    (answer,) = generate_answers(
        model.eval(),
        load_chat_encoder(args.model, preprocessing),
        architecture,
        [record],
        given.parent if given else Path.cwd(),
        max_new_tokens=args.max_new_tokens,
        batch_size=1,
        video_sampling=preprocessing.videos,
    )
    print(answer)
    return 0


def _inspect_labels(args: argparse.Namespace) -> int:
    """Each record rendered with the model's own chat template, the trained tokens marked, and their counts."""
    data = _file(args.data, "data")
    image_root = _folder(args.image_root, "--image-root") if args.image_root else data.parent
    _checkpoint(args.model, "--model")
    if args.chat_template:
        _file(args.chat_template, "--chat-template")
    from vlm_pipeline.architectures import load_chat_encoder
    from vlm_pipeline.config.schema import PreprocessingParams
    from vlm_pipeline.data.encoding import encode_record
    from vlm_pipeline.data.validation import validate_lines
    from vlm_pipeline.reporting.data import BRACKETS, COLOUR, label_preview

    lines = data.read_bytes().splitlines()
    decoded = tempfile.TemporaryDirectory(prefix="vlm-inspect-")  # data: URI images, only for this printout
    result = validate_lines(
        lines, image_root, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, duplicates="keep", image_store=Path(decoded.name)
    )
    preprocessing = PreprocessingParams(chat_template=args.chat_template, train_on=args.train_on)
    encoder = load_chat_encoder(args.model, preprocessing)
    marks = COLOUR if sys.stdout.isatty() else BRACKETS
    for record in result.valid[: args.n]:
        row = encode_record(
            encoder, record, image_root, max_length=10**9, train_on=args.train_on, truncate_text_only=False
        )
        if row["reason"]:
            print(f"{data}:{row['source_line']}: {row['reason']}: {row['detail']}\n")
            continue
        (block,) = label_preview(encoder.tokenizer, [row], marks)
        print(f"{data}:{block.removeprefix('line ')}\n")
    for entry in result.quarantine[: args.n]:
        print(f"{data}:{entry['line']}: {entry['reason']}: {entry['detail']}", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    """A downloaded Hugging Face dataset (Parquet or save_to_disk Arrow) as train/test JSONL + images, offline."""
    from vlm_pipeline.data.importing import ImportSourceError, import_dataset, summary_lines

    try:
        report = import_dataset(Path(args.src), Path(args.out_dir))
    except ImportSourceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(report, Path(args.out_dir))))
    return 0


def _serve(args: argparse.Namespace) -> int:
    """The standard OpenAI-compatible server on a merged model (transformers serve), or the GPU host's commands."""
    from vlm_pipeline.config.schema import ModelParams
    from vlm_pipeline.serving import HOST, gpu_host_commands, serve_command

    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(
            f"error: {model / 'config.json'} not found: --model must be a merged or fully trained model folder",
            file=sys.stderr,
        )
        return 2
    loading = ModelParams(**({"dtype": args.dtype} if args.dtype else {})).loading_kwargs()
    host = args.host or HOST
    command = serve_command(model, args.port, loading, host=host)
    if args.print:
        print(" ".join(command))
        print("\n".join(gpu_host_commands(model, args.port)))
        return 0
    print(f"serving {model} on http://{host}:{args.port}/v1 (model name: {model}); Ctrl+C stops it", flush=True)
    try:
        return subprocess.run(command, check=False).returncode
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    from vlm_pipeline.config.schema import DTYPES
    from vlm_pipeline.recipes import RECIPES  # a table: Kedro and torch are imported only when a command runs

    parser = argparse.ArgumentParser(
        prog="vlm-pipeline", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, func) -> argparse.ArgumentParser:
        """A subcommand whose one-line summary is both its line in the list and its own --help description."""
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.set_defaults(func=func)
        return sub

    tiny = command("tiny-model", "Build a tiny random model of a real architecture, offline.", _tiny_model)
    tiny.add_argument(
        "--arch",
        required=True,
        type=_architecture,
        metavar="NAME",
        help="a family registered in vlm_pipeline.architectures, e.g. qwen2_5_vl (a wrong name lists them all)",
    )
    tiny.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    tiny.add_argument("--seed", type=int, default=0, help="the build is deterministic for a given seed")

    validate = command(
        "validate", "Validate a JSONL file; write valid.jsonl, quarantine.jsonl and report.json.", _validate
    )
    validate.add_argument("input", help="JSONL file in any accepted format (docs/data.md)")
    validate.add_argument("--image-root", required=True, help="folder image paths are relative to")
    validate.add_argument("--output-dir", required=True, help="valid.jsonl, quarantine.jsonl, report.json, images/")
    validate.add_argument(
        "--max-invalid-fraction",
        type=float,
        default=DEFAULT_MAX_INVALID_FRACTION,
        help="exit 1 if more than this share of the records is quarantined (default %(default)s)",
    )
    validate.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="quarantine images with more pixels than this (default %(default)s)",
    )
    validate.add_argument(
        "--duplicates",
        choices=["reject", "keep"],
        default="reject",
        help="reject (quarantine) or keep records identical to an earlier one (default %(default)s)",
    )
    validate.add_argument("--show", type=int, default=10, help="print this many quarantined lines (FILE:LINE: ...)")
    validate.add_argument("--model", help="also measure each record with this model's processor (too_long check)")
    validate.add_argument("--max-length", type=int, default=512, help="with --model: longest record in tokens")

    metrics = command("metrics", "Print the base-vs-tuned table of a metrics.json.", _metrics)
    metrics.add_argument(
        "path", nargs="?", default="data/08_reporting/lora/metrics.json", help="metrics.json (default %(default)s)"
    )

    recipe = command(
        "recipe", "Print a seed recipe's kedro command; --cpu-smoke runs it here on a tiny model.", _recipe
    )
    recipe.add_argument(
        "name", choices=list(RECIPES), help="; ".join(f"{name}: {seed.summary}" for name, seed in RECIPES.items())
    )
    recipe.add_argument("--cpu-smoke", action="store_true", help="run it here: tiny model, one CPU process, 4 steps")
    recipe.add_argument(
        "--nodes", type=int, help="print a Slurm batch script running it on this many machines (docs/distributed.md)"
    )

    parameters = command(
        "parameters",
        "Write the validated parameters a run of --env gets, as YAML (dvc.yaml's first stage).",
        _parameters,
    )
    parameters.add_argument("--env", default="base", help="conf environment, as kedro run --env")
    parameters.add_argument("--base-model", required=True, help="the run's base_model (checkpoint folder)")
    parameters.add_argument("--raw-data", required=True, help="the run's raw_data (folder holding train.jsonl)")
    parameters.add_argument("--out", required=True, help="YAML file to write (atomically)")

    plan = command("plan", "Steps, checkpoints and GPU memory (GB) of a run, before launching it.", _plan)
    plan.add_argument("--recipe", choices=list(RECIPES), help="a seed recipe: its env, pipeline and published config")
    plan.add_argument("--env", default="base", help="conf environment, as kedro run --env")
    plan.add_argument(
        "--pipeline", default="lora", choices=["lora", "full_ft"], help="the variant to plan (default %(default)s)"
    )
    plan.add_argument("--model-config", help="folder with the model's config.json (default: base_model)")
    plan.add_argument(
        "--raw-data",
        help="the run's raw_data (default: the environment's); its token lengths are measured once it is preprocessed",
    )
    plan.add_argument(
        "--records",
        type=int,
        help="training records, each planned at max_length (default: count and measure the preprocessed raw_data)",
    )
    plan.add_argument(
        "--gpu-memory-gb", type=float, help="GPU memory in GB to check against (default: plan.gpu_memory_gb)"
    )

    predict = command(
        "predict", "Answer one prompt (and image or video) with a model, or a base + LoRA adapter.", _predict
    )
    predict.add_argument("--model", required=True, help="model directory (a base, or a merged/full FT model)")
    predict.add_argument("--adapter", help="LoRA adapter directory to apply on --model")
    predict.add_argument("--image", help="image file (vision models)")
    predict.add_argument(
        "--video", help="video clip, or a folder of frames (Qwen2.5-VL); frames sampled as training samples them"
    )
    predict.add_argument("--prompt", required=True, help="the user's question")
    predict.add_argument(
        "--max-new-tokens", type=int, default=32, help="longest answer in tokens, greedy (default %(default)s)"
    )

    inspect = command(
        "inspect-labels", "Show which tokens of each record train, with the model's chat template.", _inspect_labels
    )
    inspect.add_argument("data", help="a JSONL file (any supported format)")
    inspect.add_argument("--model", required=True, help="model directory whose chat template and processor to use")
    inspect.add_argument("-n", type=int, default=3, help="records to show (default 3)")
    inspect.add_argument("--image-root", help="folder the image paths are relative to (default: the file's folder)")
    inspect.add_argument(
        "--chat-template", help="a .jinja file replacing the model's template (preprocessing.chat_template)"
    )
    inspect.add_argument(
        "--train-on",
        default="all_assistant_turns",
        choices=["all_assistant_turns", "last_assistant_turn"],
        help="which assistant turns train (preprocessing.train_on; default %(default)s)",
    )

    serve = command(
        "serve",
        "Serve a merged model with an OpenAI-compatible API (transformers serve); --print for GPU hosts.",
        _serve,
    )
    serve.add_argument("--model", required=True, help="a merged or fully trained model folder (data/06_models/...)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    serve.add_argument("--host", help="address to listen on (default: this machine's loopback only)")
    serve.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weights dtype (default: model.dtype's default, as evaluation loads it; auto: the folder's own)",
    )
    serve.add_argument(
        "--print", action="store_true", help="print the transformers serve, vLLM and SGLang commands instead"
    )

    importer = command(
        "import", "Turn a downloaded HF dataset (Parquet, save_to_disk) into train/test JSONL + images.", _import
    )
    importer.add_argument("src", help="a .parquet file, a folder of Parquet shards, or a save_to_disk folder")
    importer.add_argument("out_dir", help="folder for train.jsonl, test.jsonl, images/ and the import report")
    for sub in commands.choices.values():
        sub.add_argument("--verbose", "-v", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> None:
    from vlm_pipeline.warning_filters import hide_understood_warnings

    hide_understood_warnings()
    args = build_parser().parse_args(argv)
    sys.exit(_run_reporting_errors(args))


def _run_reporting_errors(args: argparse.Namespace) -> int:
    """The command's exit status; vlm-pipeline's own errors as one ``error:`` line (a traceback with --verbose),
    any other exception with its traceback, since that is a bug."""
    try:
        return args.func(args)
    except Exception as error:
        if args.verbose or not is_own_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2 if is_input_error(error) else 1
