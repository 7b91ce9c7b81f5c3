"""The trainer entry point: one process of a (possibly distributed) TRL SFT run.

Runs on its own, or under accelerate (which the Kedro training node uses):

    accelerate launch --config_file conf/accelerate/cpu_single_process.yaml \\
        -m vlm_pipeline.training.trainer --config run_config.json

The JSON config is a ``RunConfig`` (``vlm_pipeline.config.run``), saved by the training stage. Checkpoints go to
``checkpoint_root/<identity>`` (the config's hash) and a killed run resumes from the newest one. Only the main
process writes the final model, the processor and the log history into ``final_dir``, and keeps a hard-linked
copy in ``checkpoint_dir/final`` so that the same config run again returns the same model without training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate.utils import broadcast_object_list
from datasets import load_from_disk
from peft import LoraConfig, prepare_model_for_kbit_training
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PrinterCallback, TrainerCallback, set_seed
from transformers.trainer_utils import seed_worker
from trl import SFTConfig, SFTTrainer

from vlm_pipeline.architectures import Architecture, architecture_for_model, load_model, load_processor
from vlm_pipeline.atomic import link_tree, replace_dir_atomic, staging_dir_for
from vlm_pipeline.config.run import RunConfig
from vlm_pipeline.data.encoding import vision_rows
from vlm_pipeline.library_bars import hide_library_bars_in_logs, on_terminal
from vlm_pipeline.model_files import IncompleteModelError, check_saved_model
from vlm_pipeline.reporting.tables import format_parameter_table
from vlm_pipeline.training import cpu_distributed
from vlm_pipeline.training.checkpoints import (
    finished_run,
    holds_full_model,
    last_complete_checkpoint,
    load_full_model_weights,
)
from vlm_pipeline.training.collator import SFTCollator
from vlm_pipeline.training.guards import GuardedTraining, newest_checkpoint_note
from vlm_pipeline.training.param_groups import ComponentLearningRates, optimizer_groups
from vlm_pipeline.training.progress import ProgressLog
from vlm_pipeline.training.quantization import bits_and_bytes_config
from vlm_pipeline.training.sampler import ModalityGroupedSampler, index_sampler, is_mixed
from vlm_pipeline.training.stopping import StopOnSignal, StopRequested, TrainingStopped
from vlm_pipeline.training.throughput import MeteredTraining
from vlm_pipeline.training.token_budget import TokenBudgetBatchSampler
from vlm_pipeline.training.trainable import freeze, lora_target_modules, parameter_table


def build_sft_config(config: RunConfig, mixed_modalities: bool = False) -> SFTConfig:
    """TRL's SFTConfig from the run config; the data is already tokenised and collated by us.

    ``mixed_modalities``: the training split holds image and text-only rows."""
    fixed = {
        "output_dir": str(config.checkpoint_dir),
        "learning_rate": config.method.learning_rate,
        "remove_unused_columns": False,  # keep image_paths for the collator
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "max_length": None,  # records were length-checked at preprocessing, never truncated here
        "report_to": "none",  # MLflow logging is the Kedro side's job (main process only)
        "save_only_model": False,  # checkpoints keep optimizer and scheduler state, so a resume is exact
        # transformers refuses bf16/fp16 without a GPU unless told it runs on the CPU (where torch emulates them).
        "use_cpu": not torch.cuda.is_available(),
        # tqdm's bar on a terminal only; in a log, ProgressLog prints a line per tenth of the run instead.
        "disable_tqdm": not on_terminal(),
    }
    if mixed_modalities and config.sft.ddp_find_unused_parameters is None:
        # A text-only step leaves what only images reach (vision tower, projector, Mllama's cross-attention)
        # without gradients, which DDP refuses unless it searches for unused parameters; transformers turns that
        # search off under gradient checkpointing (our non-reentrant checkpointing supports it).
        fixed["ddp_find_unused_parameters"] = True
    return SFTConfig(**{**config.sft.trainer_args(), **fixed})


class CurvesFile(TrainerCallback):
    """Appends each ``on_log`` entry, with its optimizer step, to a JSON-lines file, on the main process only. The
    Kedro process follows the file into its MLflow run (``live_metrics.FollowCurves``), so the trainer itself
    neither imports MLflow nor opens its store (about 2 s of start-up)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a", encoding="utf-8") as curves:
                curves.write(json.dumps({**logs, "step": state.global_step}) + "\n")


class NonFiniteTrainingError(TrainingStopped):
    """The loss or gradient norm became NaN or infinite; the message names the optimizer step."""


class IncompleteSaveError(TrainingStopped):
    """The saved model (or adapter) lacks tensors of its base (or of its targets); the message names them."""


def check_final_model(final_dir: Path, base: Path, step: int) -> None:
    """Stop the run when the model it saved is not complete (``model_files``): a full model must hold the base's
    tensors in their shapes, an adapter LoRA weights for each module it targets."""
    try:
        check_saved_model(final_dir, base)
    except IncompleteModelError as error:
        raise IncompleteSaveError(f"training stopped after optimizer step {step}: {error}") from error


class VLMSFTTrainer(MeteredTraining, GuardedTraining, ComponentLearningRates, SFTTrainer):
    """TRL's SFTTrainer, batching by modality when a vision dataset mixes text-only and image rows, and stopping
    on a non-finite loss or gradient norm before the optimizer applies it. It also stops a diverged run and one
    whose trainable component gets no gradient (``GuardedTraining``), and gives each component its own optimizer
    groups and learning rate (``ComponentLearningRates``).

    transformers only logs such a loss (``logging_nan_inf_filter`` even hides it) and steps on, so a run would
    silently write NaN weights into every later checkpoint. Stopping here keeps the last complete checkpoint,
    written before the bad step, as the newest one. Seconds and tokens per optimizer step are measured
    (``MeteredTraining``) and saved as ``throughput.json``."""

    def __init__(
        self,
        *args,
        architecture: Architecture,
        max_tokens_per_batch: int | None = None,
        **kwargs,
    ):
        self.architecture = architecture  # its components name the optimizer's and the gradient norms' groups
        self.max_tokens_per_batch = max_tokens_per_batch  # sft.max_tokens_per_batch: micro-batches by tokens
        super().__init__(*args, **kwargs)
        # One optimizer step is a token mean over all its micro-batches on all ranks (transformers'
        # num_items_in_batch), not a mean of per-micro-batch means, which weighs a micro-batch of few tokens like
        # one of many.
        # Qwen2.5-VL's class opts out of loss kwargs (transformers #37208, a Gemma 3 fix), but the loss is TRL's
        # chunked_nll forward, which replaces the model's own and divides by num_items_in_batch when given it.
        if self.args.loss_type == "chunked_nll":
            self.model_accepts_loss_kwargs = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self._stop_non_finite("loss", loss.item())
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        positions = inputs.get("position_ids")
        if self.model.training and "attention_mask" not in inputs and positions is not None and positions.dim() == 3:
            # TRL counts a packed batch's tokens as position_ids.size(1): right for [1, L], but 1 for Qwen2.5-VL's
            # [4, 1, L] ids. Its logged ``num_tokens`` then counts the L - 1 tokens it missed too.
            missed = torch.tensor(positions.size(-1) - positions.size(1), device=positions.device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(missed).sum().item()
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)).all():
            self._stop_non_finite("gradient norm", float(grad_norm))
        return grad_norm

    def _stop_non_finite(self, what: str, value: float) -> None:
        step = self.state.global_step + 1
        kept = newest_checkpoint_note(self.args.output_dir)
        raise NonFiniteTrainingError(
            f"training stopped at optimizer step {step}: the {what} is {value}; {kept}. Lower the learning "
            "rate, check the data of this step, or use bf16 instead of fp16"
        )

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if cpu_distributed.needs_adjustment(self.accelerator):  # CPU-only: FSDP/DeepSpeed on gloo
            cpu_distributed.adopt_requested_engine(self)

    def _run_epoch(self, **kwargs):
        # A mid-epoch resume wraps the batch sampler in accelerate's SkipBatchSampler, through which neither
        # accelerate's nor transformers' set_epoch reaches the index sampler once a BatchSamplerShard (several
        # processes) sits between them: the resumed epoch would replay epoch 0's order. Set it here, on the sampler
        # object that every wrapper shares.
        sampler = index_sampler(kwargs["train_dataloader"])
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(**kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.model if model is None else model
        plain = isinstance(target, PreTrainedModel) and not self.is_fsdp_enabled  # FSDP loads its own shards
        if plain and holds_full_model(Path(resume_from_checkpoint)):
            load_full_model_weights(target, Path(resume_from_checkpoint))  # see there: the Trainer's own loses them
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = Path(self.state.best_model_checkpoint)
        plain = isinstance(self.model, PreTrainedModel) and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        if plain and holds_full_model(best):
            load_full_model_weights(self.model, best)
        else:
            super()._load_best_model()

    def get_train_dataloader(self) -> DataLoader:
        if self.max_tokens_per_batch is None:
            return super().get_train_dataloader()
        # transformers' own DataLoader (Trainer._get_dataloader) with our batch sampler in place of batch_size and
        # sampler: it passes only its own rebalancing sampler as a batch_sampler.
        dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        loader = DataLoader(
            dataset,
            batch_sampler=self._token_budget_batches(dataset),
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            multiprocessing_context=self.args.dataloader_multiprocessing_context,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            in_order=self.args.dataloader_in_order,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        return self.accelerator.prepare(loader)

    def _token_budget_batches(self, dataset) -> TokenBudgetBatchSampler:
        has_images = vision_rows(dataset)
        batches = TokenBudgetBatchSampler(
            list(dataset["length"]),
            has_images,
            self.max_tokens_per_batch,
            self.args.seed,
            world_size=self.args.world_size,
            packed=self.data_collator.padding_free,  # a packed micro-batch costs its tokens, a padded one more
        )
        if self.is_world_process_zero():
            layout = "packed" if self.data_collator.padding_free else "padded"
            print(
                f"vlm-pipeline: micro-batches of at most {self.max_tokens_per_batch} tokens ({layout}), image and "
                f"text-only rows apart: {len(batches)} an epoch for {len(has_images)} rows on {self.args.world_size} "
                "rank(s)",
                flush=True,
            )
        return batches

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        has_images = vision_rows(dataset)
        if not is_mixed(has_images):
            return super()._get_train_sampler(train_dataset)
        lengths = dataset["length"] if self.args.train_sampling_strategy == "group_by_length" else None
        # Every micro-step of all ranks together takes one modality (see sampler.py): accelerate deals the
        # DataLoader's batches out to the ranks in turn, unless split_batches cuts each batch among them itself.
        ranks = 1 if self.accelerator.split_batches else self.args.world_size
        sampler = ModalityGroupedSampler(has_images, self._train_batch_size, self.args.seed, lengths, ranks)
        if self.is_world_process_zero():
            print(
                f"vlm-pipeline: text-only and image rows mixed: each micro-step of all {ranks} rank(s) takes one "
                f"modality; {sampler.repeated} row(s) an epoch repeated to fill the last batch of each modality",
                flush=True,
            )
        return sampler


def build_trainer(config: RunConfig, curves: Path | None = None) -> SFTTrainer:
    # Seed before anything random is created: SFTTrainer wraps the model with fresh LoRA weights before
    # the Trainer seeds itself, so without this two runs of one config start from different adapters.
    set_seed(config.sft.seed)
    base = config.base_model
    architecture = architecture_for_model(base)
    processor = load_processor(
        base,
        image_bounds=config.image_bounds.model_dump(),
        video_sampling=config.video_sampling.model_dump(),
        chat_template=config.chat_template,
        trust_remote_code=config.model.trust_remote_code,
    )
    quantization = config.method.quantization
    quantized = quantization is not None and quantization.enabled
    model = load_model(
        base,
        **config.model.loading_kwargs(),
        quantization_config=bits_and_bytes_config(quantization, architecture) if quantized else None,
    )
    turn_off_kv_cache(model)
    if quantized:
        # PEFT's k-bit preparation: freeze the quantized base, keep norms and other unquantized weights in
        # fp32, and set up gradient checkpointing so gradients reach the adapters through frozen inputs.
        # No forward pass may run in eval mode before training: on CPUs with AVX512-BF16 it repacks 4-bit
        # weights, after which LoRA gradients are silently None (nothing here or in TRL's init does one).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.sft.gradient_checkpointing,
            gradient_checkpointing_kwargs=config.sft.gradient_checkpointing_kwargs or {"use_reentrant": False},
        )
    freeze(model, architecture, config.method.freeze.model_dump())
    peft_config = None
    if config.method.lora is not None:
        lora = config.method.lora.model_dump()
        targets = lora_target_modules(model, architecture, lora["target_modules"])
        peft_config = LoraConfig(task_type="CAUSAL_LM", **{**lora, "target_modules": targets})
    train_dataset = load_from_disk(str(config.train_dataset))
    trainer = VLMSFTTrainer(
        model=model,
        args=build_sft_config(config, mixed_modalities=is_mixed(vision_rows(train_dataset))),
        train_dataset=train_dataset,
        eval_dataset=load_from_disk(str(config.eval_dataset)) if config.eval_dataset else None,
        processing_class=processor,
        data_collator=SFTCollator(
            processor,
            architecture,
            config.image_root,
            architecture.padding_free(config.sft.padding_free),
            model_config=model.config,
        ),
        peft_config=peft_config,
        architecture=architecture,
        max_tokens_per_batch=config.sft.max_tokens_per_batch,
        divergence_check=config.sft.divergence_check,
        learning_rates=config.method.learning_rates,
        # curves: the file the Kedro run follows into its MLflow run while this trains
        callbacks=[ProgressLog(), *([CurvesFile(curves)] if curves else [])],
    )
    if trainer.args.disable_tqdm:
        # In a log, ProgressLog's lines carry the loss: the printer's dict every logging_steps would be hundreds
        # more lines (training_history.json and MLflow keep every logged value).
        trainer.remove_callback(PrinterCallback)
    if peft_config is not None:
        train_adapters_in_float32(trainer)
    return trainer


def turn_off_kv_cache(model: PreTrainedModel) -> None:
    """No KV cache in training: it is useless there, and with one transformers does not read packed records'
    boundaries from their position ids, so each would attend to the records before it. A vision model's language
    model reads its own config (``text_config``), which the top-level ``use_cache`` does not reach."""
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False


def train_adapters_in_float32(trainer: SFTTrainer) -> None:
    """LoRA: the frozen base stays in its load dtype; what trains (adapters, modules_to_save) is float32.

    PEFT upcasts adapters itself, but TRL casts them to bf16 over a quantized base; small bf16 updates to
    bf16 weights round away. Under DeepSpeed ZeRO-3 the adapters keep the base's dtype: ZeRO-3 gathers
    parameters into buffers of one dtype (TRL issue #6089)."""
    plugin = trainer.args.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        return
    for parameter in trainer.model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def engine_record(trainer: SFTTrainer) -> dict[str, Any]:
    """What actually ran: a silent fallback (FSDP or DeepSpeed quietly becoming DDP or one process) shows here."""
    accelerator = trainer.accelerator
    return {
        "world_size": accelerator.num_processes,
        # torchrun's LOCAL_WORLD_SIZE: processes on this machine (absent when not launched by torchrun)
        "nodes": accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
        "distributed_type": accelerator.distributed_type.value,
        "engine": type(trainer.model_wrapped).__name__,
        "dtensor_parameters": any(type(p).__name__ == "DTensor" for p in trainer.model_wrapped.parameters()),
        "global_step": trainer.state.global_step,
        "optimizer_groups": optimizer_groups(trainer.optimizer),  # what each component's group really trained with
        "quantized_layers": dict(
            Counter(type(m).__name__ for m in trainer.model.modules() if type(m).__module__.startswith("bitsandbytes"))
        ),
    }


def run(config: RunConfig, curves: Path | None = None) -> None:
    checkpoints = config.checkpoint_dir
    finished = checkpoints / "final"
    final_dir = config.final_dir
    if finished_run(checkpoints) is not None:
        # This exact configuration already finished: hand out that result. Resuming a finished run would
        # train one step more (transformers) and so give a different model for the same config.
        link_tree(finished, final_dir)
        return
    trainer = build_trainer(config, curves)
    stop = StopOnSignal(trainer.accelerator.device).install()
    trainer.add_callback(stop)
    trainable = parameter_table(trainer.model, architecture_for_model(config.base_model))
    if trainer.is_world_process_zero():
        print(f"vlm-pipeline: trainable parameters: {format_parameter_table(trainable)}", flush=True)
    # The main process tidies incomplete checkpoints away; every rank then resumes from the same folder.
    choice = [last_complete_checkpoint(checkpoints) if trainer.is_world_process_zero() else None]
    resume = broadcast_object_list(choice)[0]
    if resume is not None and trainer.is_local_process_zero():  # each machine's log names what it resumes from
        print(f"vlm-pipeline: resuming from {resume} (the newest complete checkpoint)", flush=True)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.stopped_at is not None:
        trainer.accelerator.end_training()
        raise StopRequested(
            f"vlm-pipeline: stopped on SIGTERM after optimizer step {stop.stopped_at}; its checkpoint is "
            f"{checkpoints / f'checkpoint-{stop.stopped_at}'}. Run the same command again to resume from it."
        )
    # Every rank calls save_model: under FSDP and ZeRO-3 gathering the full weights is collective. Only the
    # main process writes (transformers checks should_save), and only it writes the files below.
    trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        check_final_model(final_dir, config.base_model, trainer.state.global_step)  # before it is kept as final
        # The Trainer pickles its arguments beside the weights; the run config JSON already records them.
        (final_dir / "training_args.bin").unlink(missing_ok=True)
        (final_dir / "run_info.json").write_text(json.dumps(engine_record(trainer), indent=2))
        trainer.processing_class.save_pretrained(str(final_dir))
        (final_dir / "training_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
        (final_dir / "trainable_parameters.json").write_text(json.dumps(trainable, indent=2))
        (final_dir / "throughput.json").write_text(json.dumps(trainer.throughput.summary(), indent=2))
        replace_dir_atomic(link_tree(final_dir, staging_dir_for(finished)), finished)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # accelerate's end of a script: the process group is destroyed


def exit_worker(status: int) -> NoReturn:
    """End a worker whose results (the model, or the checkpoint it stopped at) are on disk, without tearing the
    interpreter down.

    A gloo worker thread drops its last reference to a finished collective (and the tensors it holds) a moment
    after the collective returns. When that lands while Python is finalizing, the process aborts with SIGABRT
    (pytorch/pytorch#179291; seen on the last barrier under DeepSpeed ZeRO-3 on CPU, 3 runs in 73 on a loaded
    2-core machine), and the launcher reports a failed run after a complete one. Every file this process wrote
    is closed (the curves file after each line), so flushing the streams is all the teardown there is to do.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="run config JSON written by the launcher")
    parser.add_argument(
        "--curves", type=Path, help="append each logged entry to this JSON-lines file (the Kedro run follows it)"
    )
    args = parser.parse_args(argv)
    hide_library_bars_in_logs()
    try:
        run(RunConfig.read(args.config), args.curves)
    except StopRequested as stopped:
        if os.environ.get("RANK", "0") == "0":  # torchrun's global rank: say it once
            print(stopped.message, flush=True)
        exit_worker(stopped.code)
    except TrainingStopped as stopped:
        # The cause in one line, not a traceback (every rank that stops says it: a NaN may be one rank's alone).
        message = str(stopped)
        print(f"vlm-pipeline: {message}", flush=True)
        exit_worker(1)
    exit_worker(0)


if __name__ == "__main__":
    main()
