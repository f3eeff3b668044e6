"""``rge train``: fine-tune an RGE checkpoint (or a base Qwen2.5-VL-Instruct one, which gets ``<emb>``) with
the paper's joint objective (``rge.training``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .._about import DISTRIBUTION
from .errors import EXIT_OK, CLIError, model_error
from .options import (
    add_model_options,
    check_device,
    check_dtype,
    check_input_folder,
    check_output_folder,
    dataclass_defaults,
    positive_float,
    positive_int,
)


def add_train_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    from ..training.config import EVAL_METRICS, OPTIMIZERS, REPORTERS, SCHEDULERS, WEIGHTS_DTYPES, TrainingConfig

    default = dataclass_defaults(TrainingConfig)
    train = commands.add_parser("train", parents=[common], help="fine-tune RGE on your own data (joint objective)")
    train.add_argument("--data", nargs="+", required=True,
                       help="JSONL or parquet files (rge or MMEB-train columns), or one folder: a local MMEB-train "
                       "snapshot, streamed")  # fmt: skip
    train.add_argument("--output", required=True, help="folder for checkpoints, logs and the trained model")
    train.add_argument("--image-root", help="folder image paths are relative to (default: each data file's, or the "
                       "snapshot folder)")  # fmt: skip
    train.add_argument("--subsets", nargs="+", metavar="NAME", help="a snapshot's subsets to train on (default: all)")
    train.add_argument("--split", default=default["split"], help="a snapshot's split (MMEB-train: original, "
                       "diverse_instruction, train)")  # fmt: skip
    train.add_argument("--rationales", metavar="DIR",
                       help="a snapshot's folder of per-subset rationale files (<Subset>.json or .jsonl)")  # fmt: skip
    train.add_argument("--shuffle-buffer", type=positive_int, default=default["shuffle_buffer"],
                       help="rows of each subset a snapshot's random order is drawn from")  # fmt: skip
    add_model_options(train)
    train.set_defaults(batch_size=default["batch_size"], max_new_tokens=default["max_new_tokens"])
    train.add_argument("--max-steps", type=positive_int, help="optimiser steps (default: --epochs over the data)")
    train.add_argument("--epochs", type=positive_int, default=default["epochs"], help="passes over the data")
    train.add_argument("--micro-batch-size", type=positive_int,
                       help="rows per forward with a graph; smaller than --batch-size: cached gradients (default: "
                       "the batch)")  # fmt: skip
    train.add_argument("--learning-rate", type=positive_float, default=default["learning_rate"],
                       help="the optimiser's")  # fmt: skip
    train.add_argument("--weight-decay", type=float, default=default["weight_decay"], help="the optimiser's")
    train.add_argument("--optim", choices=OPTIMIZERS, default=default["optim"],
                       help=f"adamw: float32 moments; adamw_8bit: 8-bit moments (pip install '{DISTRIBUTION}"
                       "[train-8bit]'); adafactor: a factored second moment")  # fmt: skip
    train.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default=default["weights_dtype"],
                       help="how frozen weights are stored; bfloat16 needs --lora (adapters stay float32)")  # fmt: skip
    train.add_argument("--warmup-steps", type=int, default=default["warmup_steps"], help="linear warm-up steps")
    train.add_argument("--scheduler", choices=SCHEDULERS, default=default["scheduler"],
                       help="learning rate after the warm-up")  # fmt: skip
    train.add_argument("--max-grad-norm", type=positive_float, default=default["max_grad_norm"],
                       help="gradient clipping")  # fmt: skip
    train.add_argument("--seed", type=int, default=default["seed"], help="data order and LoRA's initialisation")
    train.add_argument("--temperature", type=positive_float, default=default["temperature"],
                       help="InfoNCE temperature")  # fmt: skip
    train.add_argument("--lm-weight", type=float, default=default["lm_weight"], help="weight of the LM loss")
    train.add_argument("--no-reasoning", action="store_true",
                       help="queries embed on the candidate path (prompt + <emb>), no rationale generated")  # fmt: skip
    train.add_argument("--max-negatives", type=int, help="hard negatives per example (default: all the row has)")
    train.add_argument("--mix-tasks", action="store_true", help="batches mix tasks (default: one task per batch)")
    train.add_argument(
        "--lora", action="store_true", help=f"train a LoRA adapter (pip install '{DISTRIBUTION}[train]')"
    )
    train.add_argument("--lora-r", type=positive_int, default=default["lora_r"], help="LoRA rank")
    train.add_argument("--lora-alpha", type=positive_int, default=default["lora_alpha"], help="LoRA scaling")
    train.add_argument("--lora-dropout", type=float, default=default["lora_dropout"], help="LoRA dropout")
    train.add_argument("--no-dora", action="store_true", help="plain LoRA (default: DoRA, as the authors train)")
    train.add_argument("--lora-target-modules", nargs="+", help="module name suffixes (default: the authors')")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward: less memory, more time")  # fmt: skip
    train.add_argument("--save-steps", type=int, default=default["save_steps"],
                       help="resumable checkpoint every N steps and at the last (0: none)")  # fmt: skip
    train.add_argument("--logging-steps", type=positive_int, default=default["logging_steps"],
                       help="log every N steps")  # fmt: skip
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    train.add_argument("--overwrite-output-dir", action="store_true",
                       help="start afresh in an --output an earlier run trained into")  # fmt: skip
    train.add_argument("--no-tensorboard", action="store_true", help="log to log.jsonl only")
    train.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard weights, gradients, optimiser state over the processes")  # fmt: skip
    train.add_argument("--ddp-timeout", type=positive_float, default=default["ddp_timeout"], metavar="SECONDS",
                       help="under torchrun: a process waiting this long for the others fails")  # fmt: skip
    train.add_argument("--eval-data", nargs="+", default=[], metavar="FILE",
                       help="held-out rows (as --data): Recall@1, NDCG@10, rationale lengths")  # fmt: skip
    train.add_argument("--eval-steps", type=int, default=default["eval_steps"], metavar="N",
                       help="evaluate on --eval-data every N steps and at the last (0: at the last only)")  # fmt: skip
    train.add_argument("--report-to", nargs="+", choices=REPORTERS, metavar="NAME",
                       help=f"where the log goes besides log.jsonl: {', '.join(REPORTERS)} (default: tensorboard "
                       "when installed)")  # fmt: skip
    train.add_argument("--save-total-limit", type=positive_int, metavar="N",
                       help="keep the newest N checkpoints, and the best one (default: all)")  # fmt: skip
    train.add_argument("--metric-for-best-model", choices=EVAL_METRICS, metavar="NAME",
                       help="keep and record the checkpoint that scores best on this eval metric (eval/recall@1_"
                       "reasoning, ...: docs/training.md)")  # fmt: skip
    train.add_argument("--greater-is-better", action=argparse.BooleanOptionalAction,
                       help="for --metric-for-best-model (default: yes, except for eval/emb_only_share)")  # fmt: skip
    train.add_argument("--load-best-model-at-end", action="store_true",
                       help="save the best checkpoint's weights as the trained model")  # fmt: skip


def training_config(args: argparse.Namespace) -> Any:
    """The run's ``TrainingConfig`` from the options, checked before anything is loaded."""
    from ..training import TrainingConfig

    check_device(args.device)
    check_dtype(args.dtype)
    check_output_folder(Path(args.output))
    for path in args.data:
        if not Path(path).exists():
            raise CLIError(f"--data {path!r} does not exist")
    for path in args.eval_data:
        if not Path(path).is_file():
            raise CLIError(f"--eval-data {path!r} does not exist")
    if args.image_root:
        check_input_folder(Path(args.image_root), "--image-root")
    if args.rationales:
        check_input_folder(Path(args.rationales), "--rationales")
    extra = {"lora_target_modules": args.lora_target_modules} if args.lora_target_modules else {}
    try:
        return TrainingConfig(
            model=args.model, data=args.data, output=args.output, image_root=args.image_root,
            subsets=args.subsets, split=args.split, rationales=args.rationales, shuffle_buffer=args.shuffle_buffer,
            max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size, learning_rate=args.learning_rate,
            weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, scheduler=args.scheduler,
            max_grad_norm=args.max_grad_norm, seed=args.seed, temperature=args.temperature,
            lm_weight=args.lm_weight, max_new_tokens=args.max_new_tokens, reasoning=not args.no_reasoning,
            max_negatives=args.max_negatives,
            mix_tasks=args.mix_tasks, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, dora=not args.no_dora, gradient_checkpointing=args.gradient_checkpointing,
            save_steps=args.save_steps, logging_steps=args.logging_steps, resume=args.resume, device=args.device,
            fsdp=args.fsdp, ddp_timeout=args.ddp_timeout, overwrite_output_dir=args.overwrite_output_dir,
            dtype=args.dtype, optim=args.optim, weights_dtype=args.weights_dtype, min_pixels=args.min_pixels,
            max_pixels=args.max_pixels, repetition_penalty=args.repetition_penalty, tensorboard=not args.no_tensorboard,
            eval_data=args.eval_data, eval_steps=args.eval_steps, report_to=args.report_to,
            save_total_limit=args.save_total_limit, metric_for_best_model=args.metric_for_best_model,
            greater_is_better=args.greater_is_better, load_best_model_at_end=args.load_best_model_at_end, **extra,
        )  # fmt: skip
    except ValueError as error:
        raise CLIError(str(error)) from None


def run_train(args: argparse.Namespace) -> int:
    from ..training import TrainingDataError, TrainingSetupError, train

    config = training_config(args)
    try:
        output = train(config)
    except (TrainingDataError, TrainingSetupError) as error:
        raise CLIError(str(error)) from None
    except Exception as error:
        known = model_error(error, args.model)
        if known is not None:
            raise known from None
        raise
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"trained model saved to {output} (load it with RGEEncoder.from_pretrained or --model)")
    return EXIT_OK
