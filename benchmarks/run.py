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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from floors import floor_suite  # noqa: E402
from workloads import (  # noqa: E402
    PIXELS,
    SIZES,
    WORDS,
    ForceStop,
    Timer,
    _timed,
    banned_ids,
    build_encoder,
    cache_bytes,
    forced_decoder,
    peak_memory,
    query_workload,
    reset_peak,
    stop_schedule,
    sync,
    timed,
)

from rge.encoder import KV_CACHES, RGEEncoder  # noqa: E402
from rge.engine.batching import ModelBatch  # noqa: E402
from rge.engine.pooling import gather_at_token  # noqa: E402
from rge.loading import choose_attention  # noqa: E402
from rge.testing import QWEN25_VL_CHAT_TEMPLATE, make_test_image  # noqa: E402
from tests.reference import Reference  # noqa: E402

# ---------------------------------------------------------------- query variants

WORKLOADS = {
    "mixed-varied": ("mixed, varied", True, "varied"),
    "text-varied": ("text, varied", False, "varied"),
    "mixed-budget": ("mixed, to budget", True, "budget"),
}
"""Queries (every other one with an image, or text only) and rationale lengths (varied, or all to budget)."""


def run_rge(encoder: RGEEncoder, texts, images, schedule, batch_size: int, budget: int, admission: bool):
    """rge's batched decoder; returns tokens per query, seconds per part, peak KV-cache MiB, step log."""
    device = encoder.device
    timer, steps, peak = Timer(device), [], [0]

    def step(shape, seconds, running):
        timer.seconds["decode"] = timer.seconds.get("decode", 0.0) + seconds
        peak[0] = max(peak[0], cache_bytes(running))
        steps.append({**shape, "seconds": seconds})

    def prefill(items, seconds):
        timer.seconds["prefill"] = timer.seconds.get("prefill", 0.0) + seconds

    decoder = timed(forced_decoder(encoder, max_new_tokens=budget, batch_size=batch_size, admission=admission,
                                   schedule=schedule), device, on_step=step, on_prefill=prefill)  # fmt: skip
    inner = decoder.batches.inner
    inner.make_batch = _timed(inner.make_batch, timer, "images+collate")
    reset_peak(device)
    start = time.perf_counter()
    with timer.part("inputs"):
        tokenized = encoder.prepare(texts, images, reason=True, max_new_tokens=budget)
    result = decoder.run(tokenized)
    sync(device)
    total = time.perf_counter() - start
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
    tokenized = encoder.prepare(texts, images, reason=True, max_new_tokens=budget)
    tokens, vectors, timer = [], [], Timer(device)
    reset_peak(device)
    start = time.perf_counter()
    for first in range(0, len(tokenized), batch_size):
        rows = tokenized[first : first + batch_size]
        batch = encoder.model_batch(rows)
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
        first_call: dict[tuple[int, bool], float] = {}
        sample = args.reference_queries or args.queries  # the batch-1 loop is slow: timed on a sample if asked
        ref_tokens, ref_seconds, ref_peak = repeated(
            args.repeats,
            lambda: run_reference(encoder, reference, texts[:sample], images[:sample], schedule[:sample], args.budget),
        )
        generated = sum(stop or args.budget for stop in schedule)  # every variant follows the forced schedule
        per_query = ref_seconds / sample
        rows.append({**base, "variant": "reference", "batch_size": 1,
                     **_rates(args.queries, generated, per_query * args.queries), "peak_mib": ref_peak,
                     "same_tokens": True, "reference_sample": sample})  # fmt: skip
        for batch_size in args.batch_sizes:
            gen_tokens, seconds, parts, peak, gen_vectors = repeated(
                args.repeats, lambda: run_generate(encoder, texts, images, schedule, batch_size, args.budget)
            )
            rows.append({**base, "variant": "batched generate", "batch_size": batch_size,
                         **_rates(args.queries, generated, seconds), "parts": parts, "peak_mib": peak,
                         "same_tokens": gen_tokens[:sample] == ref_tokens})  # fmt: skip
            for admission in (False, True):
                if encoder.device.type == "cuda":  # the first call captures the buckets' graphs: timed apart
                    first_call[batch_size, admission] = run_rge(encoder, texts, images, schedule, batch_size,
                                                                args.budget, admission)[1]  # fmt: skip
                tokens, seconds, parts, peak_kv, peak, steps, rge_vectors = repeated(
                    args.repeats, lambda: run_rge(encoder, texts, images, schedule, batch_size, args.budget, admission)
                )
                rows.append({**base, "variant": "rge" + (" + admission" if admission else ""), "batch_size": batch_size,
                             **_rates(args.queries, generated, seconds), "parts": parts,
                             "peak_kv_mib": peak_kv, "peak_mib": peak, "same_tokens": tokens[:sample] == ref_tokens,
                             "min_cosine_vs_generate": min_cosine(rge_vectors, gen_vectors),
                             "first_call_seconds": first_call.get((batch_size, admission)),
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
    tokenized = encoder.prepare(docs, None, reason=False)
    padded = total = 0
    start = time.perf_counter()
    for first in range(0, len(tokenized), 32):
        rows = tokenized[first : first + 32]
        batch = encoder.model_batch(rows)
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

    tokenized = encoder.prepare(docs, None, reason=False)
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
    for row in reference.values():
        if row.get("reference_sample", row["queries"]) < row["queries"]:
            print(f"(the authors' loop, {row['size']} {row['workload']}: timed on {row['reference_sample']} of "
                  f"{row['queries']} queries, its rate per query; tokens compared on those)")  # fmt: skip
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
              f"{floor['matmul_tflop_s']:.0f} TFLOP/s; decode steps with >= 3/4 of {floor['batch_size']} rows "
              f"({floor['full_steps']} of {floor['decode_steps']}, {floor['queries']} queries): p50 "
              f"{floor['decode_ms_median']:.2f} ms, p90 {floor['decode_ms_p90']:.2f} ms vs floor "
              f"{floor['decode_floor_ms_median']:.2f} ms (ratio p50 {floor['decode_ratio_median']:.2f}, p90 "
              f"{floor['decode_ratio_p90']:.2f}); prefill {floor['prefill_ratio_median']:.2f}x its FLOP floor")  # fmt: skip


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
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 8 32 64 (cpu), 1 8 32 64 128 (gpu)")
    parser.add_argument("--floor-batch", type=int, default=64, help="gpu mode: rows kept running in the floor analysis")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        help="default: all three (cpu), mixed-varied (gpu)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reference-queries", type=int,
                        help="time the authors' batch-1 loop on this many queries only (its rate is per query; "
                        "default: all)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-steps", action="store_true", help="store every decode step in the JSON")
    parser.add_argument("--device", help="default: cuda in gpu mode, cpu otherwise")
    parser.add_argument("--kv-cache", choices=KV_CACHES, default="auto",
                        help="rge's query-path cache (auto: static on CUDA, dynamic elsewhere)")  # fmt: skip
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
    args.batch_sizes = args.batch_sizes or ([1, 8, 32, 64, 128] if gpu else [1, 8, 32, 64])
    args.workloads = [WORKLOADS[name] for name in args.workloads or (["mixed-varied"] if gpu else list(WORKLOADS))]
    device = torch.device(args.device or ("cuda" if gpu else "cpu"))
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.set_num_threads(args.threads)
    machine = (f"{platform.platform()}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
               f"torch {torch.__version__}, {args.threads} threads, {dtype}, budget {args.budget}, "
               f"{choose_attention(None, device) if gpu else 'sdpa'}")  # fmt: skip
    result: dict[str, Any] = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "output"},
                              "query": [], "candidates": [], "floor": None}  # fmt: skip
    result["args"]["output"] = str(args.output)
    for size in args.sizes:
        pixels, attention = (
            ((256 * 28 * 28, 1024 * 28 * 28), choose_attention(None, device)) if gpu else (PIXELS, "sdpa")
        )
        encoder = build_encoder(size, device, dtype, args.budget, pixels, attention)
        encoder.kv_cache = args.kv_cache
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
