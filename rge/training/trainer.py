"""The training loop of ``rge train``: one process, or many under ``torchrun`` / ``accelerate launch`` (DDP).

Each step: this process's share of a global batch (``batches.py``), the rationales the model generates
for its queries now, the joint loss's backward (``step.py``; GradCache below the batch size), clipping,
the optimiser and scheduler steps, a log line, and every ``save_steps`` (and at the last step) a
resumable checkpoint. With ``eval_data``, every ``eval_steps`` (and at the last step) the main process
evaluates held-out retrieval and the rationale lengths (``evaluation.py``) while the others wait; saved
checkpoints are then limited and the best one kept (``retention.py``). At the end the model (LoRA merged;
the best checkpoint's with ``load_best_model_at_end``) is saved to the output folder as a checkpoint
``RGEEncoder`` loads; a base Qwen2.5-VL model gets ``<emb>`` first (``base_model.py``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..bad_rows import ERROR_FILE, BadRow, write_bad_rows
from ..encoder import RGEEncoder
from ..errors import TrainingSetupError
from ..loading import choose_device
from .base_model import load_training_encoder
from .batches import DataPosition, epoch_plan, process_slice
from .checkpoints import (
    TrainingState,
    export_model,
    read_state,
    restore_checkpoint,
    restore_weights,
    save_checkpoint,
    trainable,
)
from .config import TrainingConfig
from .data import TrainingExample, read_training_data
from .distributed import barrier, init_from_environment, launched_world_size, local_rank, rank, world_size
from .evaluation import evaluate_retrieval, warn_if_collapsed
from .lora import require_peft, with_lora
from .mmeb_train import MMEBTrainStream, read_training_source
from .optimizers import build_optimizer, check_same_optimizer, quiet_bitsandbytes, require_optimizer
from .outputs import RunLog, check_output, report_skipped, require_reporters
from .precision import Precision, training_precision
from .retention import best_checkpoint, keep_checkpoints
from .sharding import full_weights, gathered, is_sharded, local_value, shard
from .step import EmbeddingModule, StepBatch, backward_step, build_step_batch, collate_pass

logger = logging.getLogger("rge.training")


def train(config: TrainingConfig, examples: Sequence[TrainingExample] | None = None) -> Path:
    """Run ``config`` (reading its data files unless ``examples`` are given); returns the output folder."""
    with quiet_bitsandbytes():  # what the run imports may import it (transformers' scheduler imports peft)
        return Trainer(config, examples).train()


class Trainer:
    """One training run; ``train()`` does it all. Attributes are set up by ``train()``."""

    def __init__(self, config: TrainingConfig, examples: Sequence[TrainingExample] | None = None) -> None:
        self.config = config
        self.examples = list(examples) if examples is not None else None
        self.encoder: RGEEncoder | None = None
        self.emb_added = False
        """Whether the model was a base Qwen2.5-VL one that ``<emb>`` was added to."""
        self.precision: Precision | None = None
        self.scaler: torch.amp.GradScaler | None = None
        """The gradient scaler: enabled for float16 (on CUDA), a pass-through otherwise."""
        self.eval_examples: list[TrainingExample] = []
        """The held-out rows (read on the main process only, which evaluates)."""
        self.resumed_from: Path | None = None

    def train(self) -> Path:
        config, output = self.config, self.config.output_dir
        device = _process_device(config.device)
        self.precision = precision = training_precision(config.dtype, device)
        created = init_from_environment(device, config.ddp_timeout)
        try:
            self.resumed_from = resume_from = self._check_output(output)
            examples = self._read_examples(output, resume_from)
            if config.eval_data and rank() == 0:
                self.eval_examples = read_training_data(config.eval_data, image_root=config.image_root)
            torch.manual_seed(config.seed)  # LoRA's initialisation
            encoder, peft_model = self._load_model(device)
            module = EmbeddingModule(encoder.model)
            wrapped = _distributed(module, device, fsdp=config.fsdp)
            optimizer = build_optimizer(config, trainable(module).values())
            steps_per_epoch = self._steps_per_epoch(examples)
            total = config.max_steps or config.epochs * steps_per_epoch
            scheduler = _scheduler(config, optimizer, total)
            self.scaler = precision.scaler()
            state = TrainingState(0, DataPosition(), self._settings())
            if resume_from is not None:
                state = self._resume(resume_from, module, optimizer, scheduler)
            self._loop(encoder, module, wrapped, optimizer, scheduler, examples, state, total)
            if config.load_best_model_at_end:
                self._load_best(module)
            self._export(encoder, peft_model, module)
            barrier()  # every process leaves together: a rank tearing gloo down alone can leave its peer hanging
            return output
        finally:
            if created:
                torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ set-up

    def _export(self, encoder: RGEEncoder, peft_model: Any, module: torch.nn.Module) -> None:
        """The trained model into the output folder, as a checkpoint ``RGEEncoder`` loads (main process)."""
        config, output = self.config, self.config.output_dir
        model = peft_model or encoder.model
        if is_sharded(module):  # the full weights into an unsharded copy the main process loads
            weights = full_weights(module, {name for name, _ in module.named_parameters()})
            if rank() != 0:
                return
            encoder, _ = load_training_encoder(config.model, device=torch.device("cpu"))
            model = encoder.model
            loaded = {name.removeprefix("model."): weight for name, weight in weights.items()}
            missing = {name for name, _ in model.named_parameters()} - set(loaded)
            if missing:
                raise RuntimeError(f"the sharded model's weights lack {sorted(missing)[:4]}")
            model.load_state_dict(loaded, strict=False)
        elif rank() != 0:
            return
        elif config.gradient_checkpointing:  # (a sharded run's copy never had it)
            _checkpointing(encoder.model, enable=False)
        tokenizer = encoder.checkpoint.tokenizer if self.emb_added else None
        export_model(model, encoder.checkpoint.path, output, tokenizer=tokenizer)
        report_skipped(output)

    def _check_output(self, output: Path) -> Path | None:
        if self.config.lora:  # before the model is loaded
            require_peft()
        require_optimizer(self.config)
        require_reporters(self.config.report_to)
        return check_output(output, resume=self.config.resume, overwrite=self.config.overwrite_output_dir)

    def _read_examples(self, output: Path, resume_from: Path | None) -> list[TrainingExample] | MMEBTrainStream:
        if self.examples is not None:
            return self.examples
        errors = output / ERROR_FILE if rank() == 0 else None
        resumed = read_state(resume_from).step if resume_from is not None else 0
        return read_training_source(self.config, error_file=errors, resumed_step=resumed)

    def _load_model(self, device: torch.device) -> tuple[RGEEncoder, Any]:
        config = self.config
        encoder, self.emb_added = load_training_encoder(
            config.model, device=device, min_pixels=config.min_pixels, max_pixels=config.max_pixels,
            max_new_tokens=config.max_new_tokens, repetition_penalty=config.repetition_penalty,
        )  # fmt: skip
        model, peft_model = encoder.model, None
        if config.lora:
            peft_model = with_lora(model, config, emb_id=encoder.checkpoint.emb_token_id if self.emb_added else None)
        else:
            model.requires_grad_(True)
        if config.gradient_checkpointing:
            _checkpointing(model, enable=True)
        model.train()
        self.encoder = encoder
        return encoder, peft_model

    def _plan(self, examples: list[TrainingExample], epoch: int) -> list[list[int]]:
        config = self.config
        return epoch_plan(examples, self._global_batch(), seed=config.seed, epoch=epoch, mix_tasks=config.mix_tasks)

    def _steps_per_epoch(self, examples: list[TrainingExample] | MMEBTrainStream) -> int:
        if isinstance(examples, MMEBTrainStream):
            return examples.batch_count(self._global_batch(), mix_tasks=self.config.mix_tasks)
        return len(self._plan(examples, epoch=0))

    def _global_batch(self) -> int:
        return self.config.batch_size * world_size()

    def _settings(self) -> dict[str, Any]:
        return {**self.config.as_dict(), "world_size": world_size()}

    def _resume(self, path: Path, module: torch.nn.Module, optimizer: Any, scheduler: Any) -> TrainingState:
        saved = read_state(path)
        changes = self.config.plan_changes(saved.settings)
        if saved.settings.get("world_size") != world_size():
            changes["world_size"] = (saved.settings.get("world_size"), world_size())
        if changes:
            described = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())
            raise TrainingSetupError(f"cannot resume {path}: these settings changed the data order ({described})")
        check_same_optimizer(path, saved.settings, self.config)
        if bool(saved.settings.get("fsdp")) != self.config.fsdp:  # the optimiser state is keyed otherwise
            flag = "with --fsdp" if saved.settings.get("fsdp") else "without --fsdp"
            raise TrainingSetupError(f"cannot resume {path}: it was trained {flag}; resume it the same way")
        restore_checkpoint(path, module, optimizer, scheduler, self.scaler)
        return TrainingState(saved.step, saved.position, self._settings())  # later checkpoints record today's

    # ------------------------------------------------------------------ the loop

    def _loop(
        self,
        encoder: RGEEncoder,
        module: EmbeddingModule,
        wrapped: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        examples: list[TrainingExample] | MMEBTrainStream,
        state: TrainingState,
        total: int,
    ) -> None:
        config, main = self.config, rank() == 0
        precision, scaler = self.precision, self.scaler
        assert precision is not None and scaler is not None
        collate = functools.partial(collate_pass, encoder)
        # DDP defers its all-reduce to a step's last micro-batch; FSDP reduces each micro-batch's gradients to
        # their shards at once, which keeps them sharded (deferring would keep them whole on every process).
        no_sync = getattr(wrapped, "no_sync", contextlib.nullcontext)
        parameters = list(trainable(module).values())

        def backward(value: torch.Tensor) -> None:  # float16: through the model with the loss scaled up
            scaler.scale(value).backward()

        shown = main and config.progress
        with RunLog(config.output_dir, main=main, tensorboard=config.tensorboard, report_to=config.report_to,
                    resumed_step=state.step, settings=self._settings()) as log, \
                tqdm(total=total, initial=state.step, disable=not shown, desc="training", unit="step") as bar, \
                logging_redirect_tqdm() if shown else contextlib.nullcontext():  # fmt: skip
            for position, batch, unusable in self._batches(examples, state.position, total - state.step):
                started = time.perf_counter()
                with gathered(wrapped) if config.reasoning else contextlib.nullcontext():  # whole while it generates
                    step = build_step_batch(encoder, batch, max_new_tokens=config.max_new_tokens,
                                            max_negatives=config.max_negatives, reasoning=config.reasoning)  # fmt: skip
                generated = time.perf_counter()
                if unusable or step.skipped:  # streamed rows it cannot use, rows that fail when prepared
                    self._report_step_skips([*unusable, *step.skipped], state.step + 1)
                optimizer.zero_grad(set_to_none=True)
                with precision.autocast():
                    loss = backward_step(wrapped, step, collate, temperature=config.temperature,
                                         lm_weight=config.lm_weight, micro_batch_size=config.micro_batch_size,
                                         no_sync=no_sync, backward=backward,
                                         uniform_passes=is_sharded(wrapped))  # fmt: skip
                scaler.unscale_(optimizer)  # clipping and the logged norm see the true gradients
                norm = _clip(parameters, config.max_grad_norm)
                scale = scaler.get_scale() if precision.scaled else None
                scaler.step(optimizer)  # skipped when a float16 gradient overflowed
                scaler.update()
                scheduler.step()
                state = TrainingState(state.step + 1, position, state.settings)
                values = loss.logged()
                if main and (state.step % config.logging_steps == 0 or state.step == total):
                    facts = _step_facts(step, norm, scheduler, self._global_batch(), started, generated)
                    log.write(state, values, facts if scale is None else {**facts, "loss_scale": scale})
                bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.2f}")
                bar.update(1)
                self._evaluate_and_save(state, state.step == total, log, module, optimizer, scheduler)

    def _evaluate_and_save(
        self, state: TrainingState, last: bool, log: RunLog, module: torch.nn.Module, optimizer: Any, scheduler: Any
    ) -> None:
        """At an evaluation step, the main process evaluates while the others wait; at a save step, a checkpoint
        (with that evaluation's metrics), then the checkpoints past the limit go and the best is recorded."""
        config = self.config
        metrics: dict[str, float] = {}
        if config.eval_data and (last or (config.eval_steps and state.step % config.eval_steps == 0)):
            with gathered(module):
                if rank() == 0:
                    assert self.encoder is not None
                    metrics = evaluate_retrieval(self.encoder, self.eval_examples, batch_size=config.batch_size)
                    log.write_eval(state, metrics)
                    if config.reasoning:  # a run without reasoning writes no rationale to collapse
                        warn_if_collapsed(metrics, state.step)
                barrier()
        if config.save_steps and (last or state.step % config.save_steps == 0):
            evaluated = replace(state, metrics=metrics)
            save_checkpoint(config.output_dir, module, optimizer, scheduler, evaluated, self.scaler)
            if rank() == 0:
                keep_checkpoints(config.output_dir, config, self.resumed_from)
            barrier()  # the others may read the checkpoints next (the best one, at the end): not while they go

    def _load_best(self, module: torch.nn.Module) -> None:
        """The best checkpoint's weights into ``module`` (``load_best_model_at_end``): on the main process, which
        saves the model, and on every process of a sharded one, whose weights they share."""
        config = self.config
        if rank() != 0 and not is_sharded(module):
            return
        assert config.metric_for_best_model is not None
        best = best_checkpoint(config.output_dir, config.metric_for_best_model,
                               greater_is_better=bool(config.greater_is_better))  # fmt: skip
        if best is None:
            if rank() == 0:
                logger.warning("no evaluated checkpoint to load: the model of the last step is saved")
            return
        restore_weights(best.path, module)
        if rank() == 0:
            logger.info("the trained model is %s's (%s %g)", best.path.name, config.metric_for_best_model, best.value)

    def _report_step_skips(self, skipped: list[BadRow], number: int) -> None:
        path = self.config.output_dir / ERROR_FILE
        write_bad_rows(path, [replace(row, step=number) for row in skipped], append=True)
        logger.warning("step %d: %d row%s left out of the batch, listed in %s", number, len(skipped),
                       "" if len(skipped) == 1 else "s", path)  # fmt: skip

    def _batches(
        self, examples: list[TrainingExample] | MMEBTrainStream, start: DataPosition, steps: int
    ) -> Iterator[tuple[DataPosition, list[TrainingExample], list[BadRow]]]:
        """``steps`` batches of this process from ``start``; each with the position after it and the rows
        of its share that a stream could not use."""
        if isinstance(examples, MMEBTrainStream):
            yield from examples.process_batches(start, steps, global_batch_size=self._global_batch(),
                                                seed=self.config.seed, mix_tasks=self.config.mix_tasks, rank=rank(),
                                                world_size=world_size())  # fmt: skip
            return
        epoch, number = start.epoch, start.batch
        plan = self._plan(examples, epoch)
        for _ in range(steps):
            if number >= len(plan):
                epoch, number = epoch + 1, 0
                plan = self._plan(examples, epoch)
            indices = process_slice(plan[number], rank(), world_size())
            number += 1
            yield DataPosition(epoch, number), [examples[index] for index in indices], []


def _process_device(device: str | None) -> torch.device:
    resolved = choose_device(device)
    if resolved.type == "cuda" and resolved.index is None and launched_world_size() > 1:
        return torch.device("cuda", local_rank())
    return resolved


def _distributed(module: EmbeddingModule, device: torch.device, *, fsdp: bool) -> torch.nn.Module:
    if fsdp:
        if world_size() == 1:
            raise TrainingSetupError("fsdp shards over processes: launch with torchrun --nproc-per-node N (N > 1)")
        shard(module, module.model)
        return module
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Text-only batches leave the vision tower unused; DDP must not wait for its gradients.
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def _checkpointing(model: Any, *, enable: bool) -> None:
    """Recompute activations in the backward (non-reentrant, which DDP needs); the name changed in 5.x."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _scheduler(config: TrainingConfig, optimizer: Any, total: int) -> Any:
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.scheduler == "constant" else config.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total)


def _clip(parameters: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
    if max_norm is None:
        return None
    return float(local_value(torch.nn.utils.clip_grad_norm_(parameters, max_norm)))


def _step_facts(
    step: StepBatch, norm: float | None, scheduler: Any, global_batch: int, started: float, generated: float
) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    return {"learning_rate": scheduler.get_last_lr()[0], "grad_norm": norm, "seconds": round(seconds, 4),
            "generation_seconds": round(generated - started, 4),
            "samples_per_second": round(global_batch / seconds, 3),
            "rationale_tokens": sum(map(len, step.generated)) / max(len(step.generated), 1)}  # fmt: skip
