"""rge benchmarks: the query and candidate paths against the authors' code and a plain batched generate.

    python benchmarks/run.py                         # CPU: tiny and small random models
    python benchmarks/run.py --sizes tiny --batch-sizes 1 8 --queries 16      # a quick look
    python benchmarks/run.py --mode gpu              # CUDA: real Qwen2.5-VL-3B dimensions, bf16, floor analysis

Random weights time the same as trained ones, but never emit <emb>; every variant therefore follows the
same forced schedule of rationale lengths (<emb> at a chosen step per query, suppressed elsewhere), and
the benchmark checks that all variants generate the same tokens. Writes JSON, prints tables, and with
matplotlib installed plots queries/s against batch size.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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
from rge.engine.batching import ModelBatch  # noqa: E402
from rge.engine.decoder import ReasoningDecoder  # noqa: E402
from rge.engine.generation import GenerationSettings  # noqa: E402
from rge.engine.pooling import gather_at_token  # noqa: E402
from rge.engine.slot_decoder import SlotDecoder, StaticSlotDecoder  # noqa: E402
from rge.images import VisionPreprocessor  # noqa: E402
from rge.loading import LoadedCheckpoint  # noqa: E402
from rge.prompts import PromptTemplate  # noqa: E402
from rge.testing import BASE_MODEL_DECODING, QWEN25_VL_CHAT_TEMPLATE, build_tiny_tokenizer, make_test_image  # noqa: E402
from tests.reference import Reference  # noqa: E402

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


def build_encoder(size: str, device: torch.device, dtype: torch.dtype, budget: int, pixels: tuple[int, int]):
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
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
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


class ForcedDecoder(ReasoningDecoder):
    """rge's decoder with <emb> forced at each query's scheduled step and suppressed elsewhere."""

    def __init__(self, *args: Any, schedule: Sequence[int], banned: Sequence[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schedule = list(schedule)
        self.banned = list(banned)

    def stream(self, rows: int | None = None) -> Any:
        self._stream = super().stream(rows)
        self._row_schedule = torch.zeros(self._stream.rows, dtype=torch.long, device=self.model.device)
        return self._stream

    def _prefill(self, rows: Sequence[Any], outputs: Any) -> Any:
        # Rows carry output rows as indices; the schedule follows the query (the stream's key) into its row.
        for row in rows:
            self._row_schedule[row.index] = self.schedule[self._stream.key_of(row.index)]
        return super()._prefill(rows, outputs)

    def next_tokens(self, scores: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        logits = scores.clone()
        logits[:, self.banned + [self.emb_token_id]] = -torch.inf
        tokens = logits.argmax(dim=-1)
        tokens[self._row_schedule[indices] == counts + 1] = self.emb_token_id
        return tokens


class ForcedSlotDecoder(ForcedDecoder, SlotDecoder):
    """The forced schedule on the preallocated KV cache."""


class ForcedStaticDecoder(ForcedDecoder, StaticSlotDecoder):
    """The forced schedule with fixed-shape decode steps (CUDA graphs on CUDA)."""


def forced_decoder_class(encoder: RGEEncoder) -> type[ForcedDecoder]:
    """The decoder ``encode_query`` would use on this device (preallocated cache on CUDA), with the schedule."""
    preallocated = encoder.kv_cache == "preallocated" or (encoder.kv_cache == "auto" and encoder.device.type == "cuda")
    if encoder.kv_cache == "static":
        return ForcedStaticDecoder
    return ForcedSlotDecoder if preallocated else ForcedDecoder


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


def cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- query variants


def run_rge(encoder: RGEEncoder, texts, images, schedule, batch_size: int, budget: int, admission: bool):
    """rge's batched decoder; returns tokens per query, seconds per part, peak KV-cache MiB, step log."""
    device = encoder.device
    timer, steps, peak = Timer(device), [], [0]
    decoder = forced_decoder_class(encoder)(encoder.model, encoder._model_batch, encoder.checkpoint.emb_token_id,
                            max_new_tokens=budget, batch_size=batch_size, admission=admission, schedule=schedule,
                            banned=banned_ids(encoder), generation=encoder.generation_settings)  # fmt: skip
    original_step = decoder._step

    def step(running, outputs):
        rows, width = running.size, running.attention_mask.shape[1]
        context = int(running.attention_mask.sum())
        with timer.part("decode"):
            result = original_step(running, outputs)
        peak[0] = max(peak[0], cache_bytes(running.cache))
        steps.append({"rows": rows, "width": width, "context_tokens": context, "seconds": 0.0})
        return result

    decoder.make_batch = _timed(decoder.make_batch, timer, "images+collate")
    undo = [wrap(decoder, "_prefill", timer, "prefill")]
    decoder._step = step
    reset_peak(device)
    start = time.perf_counter()
    with timer.part("inputs"):
        tokenized, _ = encoder._prepare(texts, images, reason=True, budget=budget)
    result = decoder.run(tokenized)
    sync(device)
    total = time.perf_counter() - start
    for restore in undo:
        restore()
    timer.seconds["prefill"] = timer.seconds.get("prefill", 0.0) - timer.seconds.get("images+collate", 0.0)
    return result.generated, total, timer.seconds, peak[0] / 2**20, peak_memory(device), steps, result.embeddings


def run_reference(encoder: RGEEncoder, reference: Reference, texts, images, schedule, budget: int):
    """The authors' loop: per query, batch-1 generate (stop at <emb>) and one extra forward."""
    from transformers import LogitsProcessorList

    device, emb = encoder.device, encoder.checkpoint.emb_token_id
    tokens = []
    reset_peak(device)
    start = time.perf_counter()
    for text, image, stop in zip(texts, images, schedule):
        length = reference.inputs(text, image, candidate=False)["input_ids"].shape[1]
        _, generated = reference.query(text, image, max_new_tokens=budget,
                                       logits_processor=LogitsProcessorList([ForceStop([stop], length, emb, banned_ids(encoder))]))  # fmt: skip
        tokens.append(generated)
    sync(device)
    return tokens, time.perf_counter() - start, peak_memory(device)


def run_generate(encoder: RGEEncoder, texts, images, schedule, batch_size: int, budget: int):
    """Plain batched HF generate (rows stop at <emb>), then one extra step through generate's cache that feeds
    each row its last token: masked past its end, at its own position (what a careful user writes)."""
    from transformers import LogitsProcessorList

    device, emb, pad = encoder.device, encoder.checkpoint.emb_token_id, encoder.checkpoint.pad_token_id
    model = encoder.model
    tokenized, _ = encoder._prepare(texts, images, reason=True, budget=budget)
    tokens, vectors, timer = [], [], Timer(device)
    reset_peak(device)
    start = time.perf_counter()
    for first in range(0, len(tokenized), batch_size):
        rows = tokenized[first : first + batch_size]
        batch = encoder._model_batch(rows)
        length = batch.input_ids.shape[1]
        images = {} if batch.pixel_values is None else {"pixel_values": batch.pixel_values,
                                                         "image_grid_thw": batch.image_grid_thw}  # fmt: skip
        with timer.part("generate"), torch.inference_mode():
            out = model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, **images,
                mm_token_type_ids=batch.mm_token_type_ids, max_new_tokens=budget, eos_token_id=emb,
                pad_token_id=pad, do_sample=False, return_dict_in_generate=True,
                logits_processor=LogitsProcessorList(
                    [ForceStop(schedule[first : first + len(rows)], length, emb, banned_ids(encoder))]
                ),
            )  # fmt: skip
        generated = out.sequences[:, length:]
        ends = torch.tensor([seq.index(emb) + 1 if emb in seq else len(seq) for seq in generated.tolist()],
                            device=device)  # fmt: skip
        tokens += [seq[:end] for seq, end in zip(generated.tolist(), ends.tolist())]
        with timer.part("extra_step"), torch.inference_mode():
            fed = torch.arange(generated.shape[1] - 1, device=device)[None, :] < (ends - 1)[:, None]
            mask = torch.cat([batch.attention_mask, fed.long(), torch.ones_like(ends)[:, None]], dim=1)
            text = (batch.attention_mask.sum(1) + ends - 1)[None, :]
            vision = text + model.model.rope_deltas.to(device).view(1, -1)
            positions = torch.cat([text, vision.expand(3, -1)])[:, :, None]
            last = generated.gather(1, (ends - 1)[:, None])
            hidden = model.model(input_ids=last, attention_mask=mask, position_ids=positions,
                                 past_key_values=out.past_key_values, use_cache=True).last_hidden_state[:, -1]  # fmt: skip
            vectors.append(hidden.float().cpu())
    sync(device)
    return tokens, time.perf_counter() - start, timer.seconds, peak_memory(device), torch.cat(vectors)


def query_suite(encoder: RGEEncoder, args: argparse.Namespace, size: str) -> list[dict[str, Any]]:
    reference = _reference_for(encoder)
    rows: list[dict[str, Any]] = []
    for workload, with_images, kind in args.workloads:
        texts, images = query_workload(args.queries, with_images)
        schedule = stop_schedule(args.queries, args.budget, kind)
        run_rge(encoder, texts[:4], images[:4], schedule[:4], 4, args.budget, True)  # warm-up
        base = dict(size=size, workload=workload, queries=args.queries)
        ref_tokens, ref_seconds, ref_peak = repeated(
            args.repeats, lambda: run_reference(encoder, reference, texts, images, schedule, args.budget)
        )
        generated = sum(len(t) for t in ref_tokens)
        rows.append({**base, "variant": "reference", "batch_size": 1, **_rates(args.queries, generated, ref_seconds),
                     "peak_mib": ref_peak, "same_tokens": True})  # fmt: skip
        for batch_size in args.batch_sizes:
            gen_tokens, seconds, parts, peak, gen_vectors = repeated(
                args.repeats, lambda: run_generate(encoder, texts, images, schedule, batch_size, args.budget)
            )
            rows.append({**base, "variant": "batched generate", "batch_size": batch_size,
                         **_rates(args.queries, generated, seconds), "parts": parts, "peak_mib": peak,
                         "same_tokens": gen_tokens == ref_tokens})  # fmt: skip
            for admission in (False, True):
                tokens, seconds, parts, peak_kv, peak, steps, rge_vectors = repeated(
                    args.repeats, lambda: run_rge(encoder, texts, images, schedule, batch_size, args.budget, admission)
                )
                rows.append({**base, "variant": "rge" + (" + admission" if admission else ""), "batch_size": batch_size,
                             **_rates(args.queries, generated, seconds), "parts": parts,
                             "peak_kv_mib": peak_kv, "peak_mib": peak, "same_tokens": tokens == ref_tokens,
                             "min_cosine_vs_generate": min_cosine(rge_vectors, gen_vectors),
                             "steps": steps if args.keep_steps else None})  # fmt: skip
    return rows


def repeated(times: int, run: Callable[[], tuple]) -> tuple:
    """Run ``times`` times; the last run's results with the median of the runs' seconds (element 1)."""
    runs = [run() for _ in range(times)]
    return (runs[-1][0], statistics.median(r[1] for r in runs), *runs[-1][2:])


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest row-wise cosine between two (N, D) embedding sets (1.0: the same vectors)."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).min())


def _reference_for(encoder: RGEEncoder) -> Reference:
    vision = encoder.checkpoint.vision
    return Reference(encoder.model, encoder.checkpoint.tokenizer, vision.image_processor, QWEN25_VL_CHAT_TEMPLATE,
                     vision.min_pixels, vision.max_pixels)  # fmt: skip


def _rates(queries: int, generated: int, seconds: float) -> dict[str, float]:
    return {"seconds": seconds, "queries_per_s": queries / seconds, "tokens_per_s": generated / seconds}


# ---------------------------------------------------------------- candidate path


def candidate_workload(count: int) -> list[dict[str, Any]]:
    """Documents of 4 to 200 words; a third with images from 40 px to 900 px on a side."""
    docs = []
    for i in range(count):
        doc: dict[str, Any] = {"text": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4 + (i * 37) % 197))}
        if i % 3 == 0:
            doc["image"] = make_test_image(40 + (i * 97) % 860, 40 + (i * 61) % 700, seed=i)
        docs.append(doc)
    return docs


def run_authors_candidates(encoder: RGEEncoder, docs: list[dict[str, Any]]) -> tuple[float, float]:
    """The authors' batching: input order, 32 rows, left padding to a multiple of 32, full model with all
    hidden states. Returns seconds and the share of padded tokens."""
    tokenized, _ = encoder._prepare(docs, None, reason=False)
    padded = total = 0
    start = time.perf_counter()
    for first in range(0, len(tokenized), 32):
        rows = tokenized[first : first + 32]
        batch = encoder._model_batch(rows)
        extra = -batch.input_ids.shape[1] % 32
        batch = ModelBatch(torch.nn.functional.pad(batch.input_ids, (extra, 0), value=encoder.checkpoint.pad_token_id),
                           torch.nn.functional.pad(batch.attention_mask, (extra, 0)),
                           torch.nn.functional.pad(batch.mm_token_type_ids, (extra, 0)), batch.pixel_values,
                           batch.image_grid_thw)  # fmt: skip
        with torch.inference_mode():
            out = encoder.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                                mm_token_type_ids=batch.mm_token_type_ids, output_hidden_states=True)  # fmt: skip
            gather_at_token(out.hidden_states[-1], batch.input_ids, encoder.checkpoint.emb_token_id).float().cpu()
        total += batch.attention_mask.numel()
        padded += int((batch.attention_mask == 0).sum())
    sync(encoder.device)
    return time.perf_counter() - start, padded / total


def rge_padding_share(encoder: RGEEncoder, docs: list[dict[str, Any]], batch_size: int) -> float:
    from rge.engine.batching import length_sorted_batches

    tokenized, _ = encoder._prepare(docs, None, reason=False)
    batches = length_sorted_batches(tokenized, batch_size)
    total = sum(len(rows) * max(len(r) for r in rows) for rows in batches)
    return 1 - sum(len(r) for r in tokenized) / total


def candidate_suite(encoder: RGEEncoder, args: argparse.Namespace, size: str) -> list[dict[str, Any]]:
    docs = candidate_workload(args.documents)
    encoder.encode_document(docs[:4])  # warm-up
    authors_seconds, authors_padding = run_authors_candidates(encoder, docs)
    sync(encoder.device)
    start = time.perf_counter()
    encoder.encode_document(docs, batch_size=32, show_progress_bar=False)
    sync(encoder.device)
    seconds = time.perf_counter() - start
    return [
        {"size": size, "variant": "authors' batching (32, pad to x32, full model)", "documents": args.documents,
         "seconds": authors_seconds, "documents_per_s": args.documents / authors_seconds,
         "padded_share": authors_padding},
        {"size": size, "variant": "rge (length-sorted, inner model)", "documents": args.documents, "seconds": seconds,
         "documents_per_s": args.documents / seconds, "padded_share": rge_padding_share(encoder, docs, 32),
         "speedup": authors_seconds / seconds},
    ]  # fmt: skip


# ---------------------------------------------------------------- floors (GPU mode)


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    gib = 2.0 if device.type == "cuda" else 0.5
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        target.copy_(source)
    sync(device)
    return 2 * source.numel() * 5 / (time.perf_counter() - start)


def measure_matmul(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - start)


def floor_suite(encoder: RGEEncoder, args: argparse.Namespace) -> dict[str, Any]:
    """Decode steps against bytes/bandwidth, prefill against FLOPs/matmul rate, at the largest batch size."""
    device, model = encoder.device, encoder.model
    bandwidth = measure_bandwidth(device)
    matmul = measure_matmul(device, encoder.dtype)
    text = model.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for p in text.parameters())
    weight_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    config = model.config.text_config
    kv_per_token = (
        2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    )
    kv_per_token *= torch.finfo(encoder.dtype).bits // 8
    texts, images = query_workload(args.queries, with_images=True)
    schedule = stop_schedule(args.queries, args.budget, "varied")
    batch_size = max(args.batch_sizes)
    run_rge(encoder, texts[:4], images[:4], schedule[:4], 4, args.budget, True)
    decoder = forced_decoder_class(encoder)(model, encoder._model_batch, encoder.checkpoint.emb_token_id, max_new_tokens=args.budget,
                            batch_size=batch_size, admission=True, schedule=schedule,
                            banned=banned_ids(encoder), generation=encoder.generation_settings)  # fmt: skip
    ratios, original = [], decoder._step

    def step(running, outputs):
        rows, context = running.size, int(running.attention_mask.sum()) + running.size
        floor = (weight_bytes + context * kv_per_token) / bandwidth
        sync(device)
        start = time.perf_counter()
        result = original(running, outputs)
        sync(device)
        ratios.append({"rows": rows, "measured_s": time.perf_counter() - start, "floor_s": floor})
        return result

    prefills = []
    original_prefill = decoder._prefill

    def prefill(rows, outputs):
        tokens = sum(len(r) for r in rows)
        sync(device)
        start = time.perf_counter()
        result = original_prefill(rows, outputs)
        sync(device)
        prefills.append({"tokens": tokens, "measured_s": time.perf_counter() - start,
                         "floor_s": 2 * (weight_bytes / (torch.finfo(encoder.dtype).bits // 8)) * tokens / matmul})  # fmt: skip
        return result

    decoder._step, decoder._prefill = step, prefill
    decoder.run(encoder._prepare(texts, images, reason=True, budget=args.budget)[0])
    step_ratios = [r["measured_s"] / r["floor_s"] for r in ratios]
    prefill_ratios = [p["measured_s"] / p["floor_s"] for p in prefills]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "bandwidth_gb_s": bandwidth / 1e9, "matmul_tflop_s": matmul / 1e12, "weight_gib": weight_bytes / 2**30,
        "batch_size": batch_size, "decode_steps": len(ratios),
        "decode_ratio_median": statistics.median(step_ratios), "decode_ratio_p90": float(np.percentile(step_ratios, 90)),
        "prefill_ratio_median": statistics.median(prefill_ratios),
        "decode_ms_median": 1e3 * statistics.median(r["measured_s"] for r in ratios),
        "decode_floor_ms_median": 1e3 * statistics.median(r["floor_s"] for r in ratios),
    }  # fmt: skip


# ---------------------------------------------------------------- report


def print_tables(result: dict[str, Any]) -> None:
    print(f"\n{result['machine']}")
    print(f"\n{'size':<6} {'workload':<18} {'variant':<22} {'bs':>4} {'q/s':>8} {'tok/s':>9} {'vs ref':>7} "
          f"{'vs gen':>7} {'same':>5}")  # fmt: skip
    reference = {(r["size"], r["workload"]): r for r in result["query"] if r["variant"] == "reference"}
    generate = {
        (r["size"], r["workload"], r["batch_size"]): r for r in result["query"] if r["variant"] == "batched generate"
    }
    for row in result["query"]:
        key = (row["size"], row["workload"])
        vs_gen = generate.get((*key, row["batch_size"]))
        print(f"{row['size']:<6} {row['workload']:<18} {row['variant']:<22} {row['batch_size']:>4} "
              f"{row['queries_per_s']:>8.1f} {row['tokens_per_s']:>9.0f} "
              f"{row['queries_per_s'] / reference[key]['queries_per_s']:>6.1f}x "
              f"{(row['queries_per_s'] / vs_gen['queries_per_s']) if vs_gen else 0:>6.2f}x "
              f"{'yes' if row['same_tokens'] else 'NO':>5}")  # fmt: skip
    for row in result["query"]:
        if row["variant"] == "rge + admission" and row["batch_size"] == max(r["batch_size"] for r in result["query"]):
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in row["parts"].items())
            print(
                f"time split, {row['size']} {row['workload']} bs={row['batch_size']}: {parts} (total {row['seconds']:.2f}s)"
            )
    print(f"\n{'size':<6} {'candidate variant':<48} {'docs/s':>8} {'padded':>7}")
    for row in result["candidates"]:
        print(
            f"{row['size']:<6} {row['variant']:<48} {row['documents_per_s']:>8.1f} {100 * row['padded_share']:>6.1f}%"
        )
    if result.get("floor"):
        floor = result["floor"]
        print(f"\nfloor on {floor['device']}: bandwidth {floor['bandwidth_gb_s']:.0f} GB/s, matmul "
              f"{floor['matmul_tflop_s']:.0f} TFLOP/s; decode step at bs {floor['batch_size']}: median "
              f"{floor['decode_ms_median']:.2f} ms vs floor {floor['decode_floor_ms_median']:.2f} ms "
              f"(ratio {floor['decode_ratio_median']:.2f}, p90 {floor['decode_ratio_p90']:.2f}); prefill ratio "
              f"{floor['prefill_ratio_median']:.2f}")  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    sizes = list(dict.fromkeys(r["size"] for r in result["query"]))
    workloads = list(dict.fromkeys(r["workload"] for r in result["query"]))
    figure, axes = plt.subplots(len(sizes), len(workloads), figsize=(4.4 * len(workloads), 3.4 * len(sizes)),
                                squeeze=False)  # fmt: skip
    for axis, (size, workload) in zip(axes.flat, [(s, w) for s in sizes for w in workloads]):
        rows = [r for r in result["query"] if (r["size"], r["workload"]) == (size, workload)]
        for variant, style in (("rge + admission", "o-"), ("rge", "s--"), ("batched generate", "^-")):
            points = sorted((r["batch_size"], r["queries_per_s"]) for r in rows if r["variant"] == variant)
            axis.plot(*zip(*points), style, label=variant)
        reference = next(r["queries_per_s"] for r in rows if r["variant"] == "reference")
        axis.axhline(reference, color="grey", linestyle=":", label="reference (bs 1)")
        axis.set(xscale="log", yscale="log", xlabel="batch size", ylabel="queries/s", title=f"{size}: {workload}")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help="default: tiny small (cpu), 3b (gpu)")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--documents", type=int, default=128)
    parser.add_argument("--budget", type=int, help="default: 32 (cpu), 128 (gpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-steps", action="store_true", help="store every decode step in the JSON")
    parser.add_argument("--device", help="default: cuda in gpu mode, cpu otherwise")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/benchmark.json"))
    parser.add_argument("--replot", type=Path, help="only redraw the plot (and tables) of an earlier JSON result")
    args = parser.parse_args()
    if args.replot:
        result = json.loads(args.replot.read_text())
        print_tables(result)
        plot(result, args.replot.with_suffix(".png"))
        return
    gpu = args.mode == "gpu"
    args.sizes = args.sizes or (["3b"] if gpu else ["tiny", "small"])
    args.budget = args.budget or (128 if gpu else 32)
    args.workloads = [("mixed, varied", True, "varied"), ("text, varied", False, "varied"),
                      ("mixed, to budget", True, "budget")]  # fmt: skip
    device = torch.device(args.device or ("cuda" if gpu else "cpu"))
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.set_num_threads(args.threads)
    machine = (f"{platform.platform()}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
               f"torch {torch.__version__}, {args.threads} threads, {dtype}, budget {args.budget}")  # fmt: skip
    result: dict[str, Any] = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "output"},
                              "query": [], "candidates": [], "floor": None}  # fmt: skip
    result["args"]["output"] = str(args.output)
    for size in args.sizes:
        encoder = build_encoder(
            size, device, dtype, args.budget, PIXELS if not gpu else (256 * 28 * 28, 1024 * 28 * 28)
        )
        result["query"] += query_suite(encoder, args, size)
        result["candidates"] += candidate_suite(encoder, args, size)
        if gpu:
            result["floor"] = floor_suite(encoder, args)
        del encoder
    print_tables(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {args.output}")
    plot(result, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
