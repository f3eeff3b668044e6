"""What every benchmark shares: random-weight models of real shapes, query workloads, the forced rationale
schedule that every variant follows, and timing helpers.

Random weights time the same as trained ones, but never emit <emb>; every variant therefore follows the
same forced schedule of rationale lengths (<emb> at a chosen step per query, suppressed elsewhere).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rge.encoder import RGEEncoder  # noqa: E402
from rge.engine.decoder import ReasoningDecoder  # noqa: E402
from rge.engine.decoding_settings import GenerationSettings  # noqa: E402
from rge.engine.kv_cache import SlotCache  # noqa: E402
from rge.loading import LoadedCheckpoint  # noqa: E402
from rge.prompts import PromptTemplate  # noqa: E402
from rge.testing import BASE_MODEL_DECODING, QWEN25_VL_CHAT_TEMPLATE, build_tiny_tokenizer, make_test_image  # noqa: E402
from rge.vision import VisionPreprocessor  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "kv": 2, "ffn": 128, "vision": (2, 32, 2, 64)},
    "small": {"layers": 8, "hidden": 512, "heads": 8, "kv": 4, "ffn": 1376, "vision": (4, 128, 4, 256)},
    "3b": {"layers": 36, "hidden": 2048, "heads": 16, "kv": 2, "ffn": 11008, "vision": (32, 1280, 16, 3420),
           "vocab": 151936},
}  # fmt: skip
"""Model shapes: (vision depth, hidden, heads, intermediate); "3b" is Qwen2.5-VL-3B's text and vision tower."""
PIXELS = (4 * 28 * 28, 64 * 28 * 28)
WORDS = "what is in the image find the caption of this photo which animal is on the left red car tree river".split()


# ---------------------------------------------------------------- models and workloads


def build_encoder(
    size: str, device: torch.device, dtype: torch.dtype, budget: int, pixels: tuple[int, int], attention: str = "sdpa"
):
    """A random-weight model of ``size`` with RGE's tokens, template and image processor, in memory."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    shape = SIZES[size]
    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                           "<|vision_end|>", "<emb>", "<|endoftext|>")}  # fmt: skip
    depth, v_hidden, v_heads, v_ffn = shape["vision"]
    head_dim = shape["hidden"] // shape["heads"]
    section = [head_dim // 8, (head_dim // 2 - head_dim // 8) // 2]
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": max(len(tokenizer), shape.get("vocab", 0)), "hidden_size": shape["hidden"],
                     "intermediate_size": shape["ffn"], "num_hidden_layers": shape["layers"],
                     "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv"],
                     "max_position_embeddings": 32768, "tie_word_embeddings": False,
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": section + [head_dim // 2 - sum(section)]}},
        vision_config={"depth": depth, "hidden_size": v_hidden, "num_heads": v_heads, "intermediate_size": v_ffn,
                       "out_hidden_size": shape["hidden"], "window_size": 112,
                       "fullatt_block_indexes": list(range(depth // 4 - 1, depth, max(1, depth // 4)))},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attention)
    model.eval().requires_grad_(False)
    model.generation_config.update(**BASE_MODEL_DECODING)  # every variant decodes as the real checkpoint does
    checkpoint = LoadedCheckpoint(
        model=model, tokenizer=tokenizer, vision=VisionPreprocessor(Qwen2VLImageProcessorPil(), *pixels),
        template=PromptTemplate.from_chat_template(tokenizer, QWEN25_VL_CHAT_TEMPLATE), emb_token_id=ids["<emb>"],
        image_pad_id=ids["<|image_pad|>"], pad_token_id=ids["<|endoftext|>"], path=Path(f"<random {size}>"),
        generation=GenerationSettings(**BASE_MODEL_DECODING, source="benchmark"),
    )  # fmt: skip
    return RGEEncoder(checkpoint, max_new_tokens=budget)


def query_workload(count: int, with_images: bool) -> tuple[list[str], list[Any]]:
    """Queries of 3 to 19 words; with images, every other one has an image of varied size."""
    texts, images = [], []
    for i in range(count):
        texts.append(" ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + (i * 7) % 17)) + "?")
        size = (56 + (i * 37) % 300, 56 + (i * 53) % 240)
        images.append(make_test_image(*size, seed=i) if with_images and i % 2 == 0 else None)
    return texts, images


def stop_schedule(count: int, budget: int, kind: str) -> list[int]:
    """Per query, the step at which <emb> is emitted (0: never, the row runs to the budget)."""
    if kind == "budget":
        return [0] * count
    rng = np.random.default_rng(7)
    return [int(step) for step in rng.integers(3, budget + 1, size=count)]


# ---------------------------------------------------------------- forcing the schedule in every variant


def banned_ids(encoder: RGEEncoder) -> list[int]:
    """Special tokens a trained model never writes in a rationale (image pads would break the prompt)."""
    return [i for i in encoder.checkpoint.tokenizer.all_special_ids if i != encoder.checkpoint.emb_token_id]


class ForcedSchedule:
    """A token choice that emits <emb> at each query's scheduled step and bans it (and the special tokens a
    rationale never holds) elsewhere: every variant follows the same rationale lengths. Tensor operations
    only, so it runs inside a captured decode step too."""

    def __init__(self, schedule: Sequence[int], emb: int, banned: Sequence[int], rows: int, device: torch.device):
        self.schedule, self.emb, self.banned = list(schedule), emb, list(banned)
        self.row_schedule = torch.zeros(rows, dtype=torch.long, device=device)
        self.ban = torch.tensor([*self.banned, emb], device=device)

    def admit(self, rows: Sequence[int], keys: Sequence[Any]) -> None:
        """The schedule follows each query (the stream's key) into its output row."""
        for row, key in zip(rows, keys):
            self.row_schedule[row] = self.schedule[int(key)]

    def allowed(self, scores: torch.Tensor) -> torch.Tensor:
        """A copy of ``scores`` with the banned tokens and <emb> at -inf: what the schedule chooses among."""
        return scores.index_fill(1, self.ban, -torch.inf)

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        tokens = self.allowed(scores).argmax(dim=-1)
        return torch.where(self.row_schedule[rows] == counts + 1, self.emb, tokens)


def forced_decoder(
    encoder: RGEEncoder, *, schedule: Sequence[int], batch_size: int, kv_cache: str | None = None, **kwargs: Any
) -> ReasoningDecoder:
    """The decoder ``encode_query`` would use (its cache: static steps on CUDA, unless ``kv_cache`` says
    otherwise) with the forced schedule; slot caches come from the encoder's pool and one schedule is one
    choice object, so graphs captured by a warm-up are replayed by the timed runs after it."""
    key = (id(encoder), tuple(schedule), batch_size)
    if key not in _CHOICES:  # (the encoder is kept with its choice: its id is not reused meanwhile)
        _CHOICES[key] = (encoder, ForcedSchedule(schedule, encoder.checkpoint.emb_token_id, banned_ids(encoder),
                                                 batch_size, encoder.device))  # fmt: skip
    return encoder.query_decoder(batch_size, kv_cache=kv_cache, choice=_CHOICES[key][1], **kwargs)


_CHOICES: dict[tuple[int, tuple[int, ...], int], tuple[RGEEncoder, ForcedSchedule]] = {}


class TimedBatches:
    """A decoder's ``DecodeBatches`` with each prefill and step timed (the device synchronised around it)
    and reported to ``on_prefill(items, seconds)`` / ``on_step(running, seconds)`` before it runs."""

    def __init__(self, inner: Any, device: torch.device, on_step: Callable[..., None] | None = None,
                 on_prefill: Callable[..., None] | None = None) -> None:  # fmt: skip
        self.inner, self.device, self.on_step, self.on_prefill = inner, device, on_step, on_prefill

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prefill(self, items: Sequence[Any]) -> Any:
        start = self._start()
        result = self.inner.prefill(items)
        if self.on_prefill is not None:
            self.on_prefill(items, self._seconds(start))
        return result

    def step(self, running: Any) -> Any:
        shape = batch_shape(running)
        start = self._start()
        result = self.inner.step(running)
        if self.on_step is not None:
            self.on_step(shape, self._seconds(start), running)
        return result

    def _start(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def _seconds(self, start: float) -> float:
        sync(self.device)
        return time.perf_counter() - start


def timed(decoder: ReasoningDecoder, device: torch.device, **hooks: Any) -> ReasoningDecoder:
    """``decoder`` with its steps and prefills timed (``TimedBatches``)."""
    decoder.batches = TimedBatches(decoder.batches, device, **hooks)  # type: ignore[assignment]
    return decoder


def batch_shape(running: Any) -> dict[str, int]:
    """Rows, columns and real (context) tokens of a running batch, whatever its cache."""
    mask = running.used_mask if isinstance(running, SlotCache) else running.attention_mask
    return {"rows": int(mask.shape[0]), "width": int(mask.shape[1]), "context_tokens": int(mask.sum())}


class ForceStop:
    """The same schedule as a ``generate`` logits processor (row i of the batch follows ``schedule[i]``)."""

    def __init__(self, schedule: Sequence[int], prompt_length: int, emb: int, banned: Sequence[int]) -> None:
        self.schedule, self.prompt_length, self.emb = torch.tensor(schedule), prompt_length, emb
        self.banned = list(banned)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.banned + [self.emb]] = -torch.inf
        stop = (self.schedule.to(scores.device) == input_ids.shape[1] - self.prompt_length + 1).nonzero().squeeze(1)
        scores[stop] = -torch.inf
        scores[stop, self.emb] = 0.0
        return scores


# ---------------------------------------------------------------- timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timer:
    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def part(self, name: str):
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def wrap(obj: Any, name: str, timer: Timer, part: str) -> Callable[[], None]:
    """Time every call of ``obj.name`` under ``part``; returns the undo."""
    original = getattr(obj, name)
    setattr(obj, name, _timed(original, timer, part))
    return lambda: setattr(obj, name, original)


def _timed(function: Callable[..., Any], timer: Timer, part: str) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        with timer.part(part):
            return function(*args, **kwargs)

    return timed


def cache_bytes(running: Any) -> int:
    """Bytes of a running batch's keys and values: a ``SlotCache``'s buffers, or a ``DynamicCache``'s layers."""
    if isinstance(running, SlotCache):
        return sum(t.numel() * t.element_size() for t in (running.keys, running.values))
    return sum(t.numel() * t.element_size() for layer in running.cache.layers for t in (layer.keys, layer.values))


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
