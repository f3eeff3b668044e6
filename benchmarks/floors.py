"""GPU mode's floor analysis: decode steps against weight + KV bytes over the measured bandwidth, prefill
against its FLOPs over the measured matmul rate."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch
from workloads import forced_decoder, query_workload, stop_schedule, sync, timed

from rge.encoder import RGEEncoder


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


def decode_weight_bytes(model: Any) -> int:
    """Bytes a decode step reads as weights: the language model without its embedding table (a step reads
    one row of it per token), plus the output projection."""
    text = model.model.language_model
    embedding = text.embed_tokens.weight
    weights = (
        sum(p.numel() * p.element_size() for p in text.parameters()) - embedding.numel() * embedding.element_size()
    )
    return weights + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def floor_suite(encoder: RGEEncoder, args: argparse.Namespace) -> dict[str, Any]:
    """Decode steps against bytes/bandwidth, prefill against FLOPs/matmul rate, at ``args.floor_batch`` rows
    kept full by admission (4x as many queries as rows), after one untimed run (graph capture)."""
    device, model, dtype_bytes = encoder.device, encoder.model, torch.finfo(encoder.dtype).bits // 8
    bandwidth = measure_bandwidth(device)
    matmul = measure_matmul(device, encoder.dtype)
    weight_bytes = decode_weight_bytes(model)
    config = model.config.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes
    batch_size = args.floor_batch
    queries = max(args.queries, 4 * batch_size)
    texts, images = query_workload(queries, with_images=True)
    schedule = stop_schedule(queries, args.budget, "varied")
    items = encoder.prepare(texts, images, reason=True, max_new_tokens=args.budget)

    def decoder(**hooks: Any) -> Any:
        made = forced_decoder(encoder, max_new_tokens=args.budget, batch_size=batch_size, admission=True,
                              schedule=schedule)  # fmt: skip
        return timed(made, device, **hooks)

    decoder().run(items)  # warm-up: every bucket's graph is captured here
    steps, prefills = [], []

    def step(shape, seconds, running):
        context = shape["context_tokens"] + shape["rows"]
        steps.append({"rows": shape["rows"], "measured_s": seconds,
                      "floor_s": (weight_bytes + context * kv_per_token) / bandwidth})  # fmt: skip

    def prefill(rows, seconds):
        tokens = sum(len(r) for r in rows)
        prefills.append({"tokens": tokens, "measured_s": seconds,
                         "floor_s": 2 * (weight_bytes / dtype_bytes) * tokens / matmul})  # fmt: skip

    decoder(on_step=step, on_prefill=prefill).run(items)
    full = [s for s in steps if s["rows"] >= batch_size * 3 // 4] or steps
    ratios = [s["measured_s"] / s["floor_s"] for s in full]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "bandwidth_gb_s": bandwidth / 1e9, "matmul_tflop_s": matmul / 1e12, "weight_gib": weight_bytes / 2**30,
        "batch_size": batch_size, "queries": queries, "decode_steps": len(steps), "full_steps": len(full),
        "decode_ratio_median": statistics.median(ratios), "decode_ratio_p90": float(np.percentile(ratios, 90)),
        "decode_ms_median": 1e3 * statistics.median(s["measured_s"] for s in full),
        "decode_ms_p90": 1e3 * float(np.percentile([s["measured_s"] for s in full], 90)),
        "decode_floor_ms_median": 1e3 * statistics.median(s["floor_s"] for s in full),
        "prefill_ratio_median": statistics.median(p["measured_s"] / p["floor_s"] for p in prefills),
        "prefill_tokens": sum(p["tokens"] for p in prefills),
    }  # fmt: skip
