"""Everything a training run is configured by (``rge train``'s options), with its checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrainingSetupError

LORA_TARGET_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "k_proj", "q_proj", "out_proj", "v_proj")
"""The authors' LoRA targets (names matched as module-name suffixes; in Qwen2.5-VL they hit the language
model's attention and down projections and the vision blocks' down projections)."""

SCHEDULERS = ("linear", "cosine", "constant")

OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor")
"""``optim``: torch's AdamW (two float32 moments), bitsandbytes' AdamW8bit (two 8-bit moments) or
transformers' Adafactor (a factored second moment, no first): ``optimizers.py``."""

WEIGHTS_DTYPES = ("float32", "bfloat16")
"""``weights_dtype``: how the weights that do not train are stored (the trained ones stay float32)."""

DEFAULT_TEMPERATURE = 0.02
"""The InfoNCE temperature of the paper's objective (``rge.training.losses``)."""

PLAN_FIELDS = ("data", "batch_size", "seed", "mix_tasks", "image_root", "subsets", "split", "shuffle_buffer")
"""Settings that decide which examples form each step: a resumed run must keep them."""

REPORTERS = ("none", "tensorboard", "wandb")
"""Where ``report_to`` may send the log besides ``log.jsonl`` ("none": nowhere else)."""

EVAL_METRICS = (
    "eval/recall@1_reasoning", "eval/ndcg@10_reasoning", "eval/recall@1_no_reasoning", "eval/ndcg@10_no_reasoning",
    "eval/rationale_tokens_mean", "eval/rationale_tokens_median", "eval/rationale_tokens_p10",
    "eval/rationale_tokens_p90", "eval/emb_only_share",
)  # fmt: skip
"""What an evaluation on ``eval_data`` measures (``evaluation.py``); ``metric_for_best_model`` names one."""

LOWER_IS_BETTER = ("eval/emb_only_share",)
"""Metrics where less is better, like a loss (the share of rationales collapsed to ``<emb>`` alone)."""


@dataclass
class TrainingConfig:
    """A training run. ``batch_size`` is per process: the contrastive batch is ``batch_size`` x processes."""

    model: str
    """An RGE checkpoint, or a base Qwen2.5-VL-Instruct one (``<emb>`` is added: ``base_model.py``)."""
    data: list[str]
    """JSONL or parquet files, read whole; or one folder, a local MMEB-train snapshot, streamed
    (``mmeb_train.py``)."""
    output: str
    image_root: str | None = None
    subsets: list[str] | None = None
    """The snapshot's subsets (its configs) to train on (None: all)."""
    split: str = "original"
    """The snapshot's split (MMEB-train has ``original``, which the authors train on, ``diverse_instruction``
    and ``train``)."""
    rationales: str | None = None
    """A folder of per-subset supervision rationale files joined to the snapshot's rows (``rationales.py``)."""
    shuffle_buffer: int = 10_000
    """Rows of each subset a streamed snapshot draws its random order from (its whole subset when larger)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (default: ``epochs`` passes over the data)."""
    epochs: int = 1
    batch_size: int = 8
    micro_batch_size: int | None = None
    """Rows per forward with a graph; below the batch size, gradients are cached (GradCache)."""
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "linear"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    temperature: float = DEFAULT_TEMPERATURE
    lm_weight: float = 1.0
    max_new_tokens: int = 128
    """Budget of the self-generated rationales (the query path's)."""
    reasoning: bool = True
    """Queries write a rationale before ``<emb>`` (the paper's objective); False: they take the candidate path
    (prompt + ``<emb>``, one forward, nothing generated), which trains a plain embedding model (the paper's
    ablation without reasoning)."""
    max_negatives: int | None = None
    """Hard negatives used per example (None: all the row has)."""
    mix_tasks: bool = False
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 64
    lora_dropout: float = 0.1
    dora: bool = True
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    gradient_checkpointing: bool = False
    save_steps: int = 0
    """Write a resumable checkpoint every this many steps and at the last step (0: none)."""
    logging_steps: int = 1
    resume: bool = False
    """Continue from the latest checkpoint in ``output``."""
    overwrite_output_dir: bool = False
    """Start afresh in an ``output`` an earlier run trained into (its checkpoints and log are removed)."""
    device: str | None = None
    fsdp: bool = False
    """Full fine-tuning with weights, gradients and optimiser state sharded over the processes ``torchrun``
    starts (FSDP, ``sharding.py``) instead of a whole copy on each (DDP)."""
    ddp_timeout: float = 1800
    """Seconds a process waits for the others at a collective (under ``torchrun``) before it fails instead."""
    dtype: str | None = None
    """Precision of the forward passes: bfloat16 autocast on CUDA by default, float32 on CPU; bfloat16 on
    CPU too, float16 on CUDA only (with a gradient scaler). The trained weights stay float32; the frozen
    ones are stored in ``weights_dtype``; the optimiser state is ``optim``'s."""
    optim: str = "adamw"
    """The optimiser, one of ``OPTIMIZERS``."""
    weights_dtype: str = "float32"
    """How the frozen weights are stored, one of ``WEIGHTS_DTYPES``: bfloat16 halves them under LoRA (the
    adapter and any trained rows stay float32; the passes then compute in bfloat16 unless ``dtype`` is
    float16). Refused for a full fine-tune, whose weights all train."""
    min_pixels: int | None = None
    max_pixels: int | None = None
    repetition_penalty: float | None = None
    tensorboard: bool = True
    """Also log to TensorBoard when it is installed; False leaves it out (as ``--no-tensorboard``)."""
    progress: bool = True
    eval_data: list[str] = field(default_factory=list)
    """Held-out rows (the layouts of ``data``): retrieval metrics and rationale lengths at each evaluation."""
    eval_steps: int = 0
    """Evaluate on ``eval_data`` every this many steps, and at the last step (0: at the last step only)."""
    report_to: list[str] | None = None
    """Where the log goes besides ``log.jsonl``: ``REPORTERS`` (each must be installed); None: TensorBoard when
    it is installed (unless ``tensorboard`` is False)."""
    save_total_limit: int | None = None
    """Keep the newest this many checkpoints (and the best one, and the one the run resumed from)."""
    metric_for_best_model: str | None = None
    """An ``EVAL_METRICS`` name: the checkpoint that scores best on it is kept and recorded."""
    greater_is_better: bool | None = None
    """Whether a larger ``metric_for_best_model`` is better (None: unless it is in ``LOWER_IS_BETTER``)."""
    load_best_model_at_end: bool = False
    """Save the best checkpoint's weights as the trained model, instead of the last step's."""

    def __post_init__(self) -> None:
        self.data = [str(path) for path in self.data]
        self.subsets = [str(name) for name in self.subsets] if self.subsets is not None else None
        for name in ("epochs", "batch_size", "max_new_tokens", "logging_steps", "lora_r", "shuffle_buffer"):
            _check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "micro_batch_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be at least 1, got {value}")
        _check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _check(self.ddp_timeout > 0, f"ddp_timeout must be > 0, got {self.ddp_timeout}")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _check(self.lm_weight >= 0, f"lm_weight must be >= 0, got {self.lm_weight}")
        _check(self.warmup_steps >= 0 and self.save_steps >= 0, "warmup_steps and save_steps must be >= 0")
        _check(self.max_negatives is None or self.max_negatives >= 0, "max_negatives must be >= 0")
        _check(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check(self.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}")
        _check(bool(self.data), "give at least one data file, or a snapshot folder")
        _check(not (self.resume and self.overwrite_output_dir), "resume and overwrite_output_dir exclude each other")
        _check(
            not (self.fsdp and self.lora),
            "fsdp shards full fine-tuning: LoRA's trainable weights are small, "
            "train them without --fsdp (each process holds the model, as in the authors' runs)",
        )
        _check(not (self.fsdp and self.dtype == "float16"), "fsdp trains in float32 or bfloat16, not float16")
        _check(not self.fsdp or self.optim == "adamw", "fsdp shards AdamW's state (--optim adamw); "
               f"{self.optim} does not take sharded weights")  # fmt: skip
        self.eval_data = [str(path) for path in self.eval_data]
        self._check_memory_settings()
        self._check_reporting()
        self._check_evaluation()

    def _check_memory_settings(self) -> None:
        _check(self.optim in OPTIMIZERS, f"optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        _check(self.weights_dtype in WEIGHTS_DTYPES,
               f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {self.weights_dtype!r}")  # fmt: skip
        if self.weights_dtype == "float32":
            return
        if not self.lora:
            raise TrainingSetupError(
                "weights_dtype bfloat16 needs LoRA: in a full fine-tune every weight trains, and bfloat16 keeps 8 "
                "bits of mantissa, so an optimiser update smaller than 1/256 of a weight rounds away and most "
                "steps would change nothing; train with LoRA (--lora), or keep float32 weights (and a smaller "
                "optimiser state with --optim adamw_8bit or adafactor)"
            )
        if self.dtype is None:  # bfloat16 weights compute in bfloat16 (float32 passes would need float32 weights)
            self.dtype = "bfloat16"
        _check(self.dtype in ("bfloat16", "float16"),
               f"weights_dtype bfloat16 computes in bfloat16 (or float16 on CUDA), not dtype {self.dtype}; "
               "leave dtype unset, or keep float32 weights")  # fmt: skip

    def _check_reporting(self) -> None:
        if self.report_to is None:
            return
        unknown = sorted(set(self.report_to) - set(REPORTERS))
        _check(not unknown, f"report_to: unknown {', '.join(unknown)}; use {', '.join(REPORTERS)}")
        _check("none" not in self.report_to or len(set(self.report_to)) == 1, "report_to: none goes alone")
        _check(self.tensorboard or "tensorboard" not in self.report_to,
               "tensorboard=False (--no-tensorboard) and report_to tensorboard contradict each other")  # fmt: skip
        self.report_to = [name for name in dict.fromkeys(self.report_to) if name != "none"]
        self.tensorboard = "tensorboard" in self.report_to

    def _check_evaluation(self) -> None:
        _check(self.eval_steps >= 0, f"eval_steps must be >= 0, got {self.eval_steps}")
        _check(bool(self.eval_data) or not self.eval_steps, "eval_steps needs eval_data")
        _check(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be at least 1")
        _check(self.metric_for_best_model is not None or not self.load_best_model_at_end,
               "load_best_model_at_end needs metric_for_best_model")  # fmt: skip
        metric = self.metric_for_best_model
        if metric is None:
            return
        _check(metric in EVAL_METRICS, f"metric_for_best_model: {metric!r} is not one of {', '.join(EVAL_METRICS)}")
        _check(bool(self.eval_data), "metric_for_best_model needs eval_data")
        _check(self.save_steps > 0 and self.eval_steps > 0 and self.save_steps % self.eval_steps == 0,
               "metric_for_best_model needs checkpoints that were evaluated: save_steps a multiple of eval_steps "
               "(both > 0)")  # fmt: skip
        if self.greater_is_better is None:
            self.greater_is_better = metric not in LOWER_IS_BETTER

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plan_changes(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Data-plan settings that differ from a saved run's (``{name: (saved, now)}``)."""
        now = self.as_dict()
        return {name: (saved.get(name), now[name]) for name in PLAN_FIELDS if saved.get(name) != now[name]}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
