"""Query-path benchmark: rge's batched decoder against the reference loop, on a tiny checkpoint.

The reference is the authors' algorithm (batch size 1 ``generate`` with ``<emb>`` as the stop token,
then one extra forward), the same code the tests check equivalence against. Prints a table and writes
JSON. Run from the repository root:

    python benchmarks/query_path.py [--queries 64] [--budget 32] [--layers 2] [--output benchmarks/results/query_path.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rge import RGEEncoder  # noqa: E402
from rge.testing import build_tiny_checkpoint, make_test_image  # noqa: E402
from tests.reference import Reference  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28
WORDS = (
    "what is in the image find the caption of this photo which animal is on the left side red car tree river".split()
)


def workload(count: int, with_images: bool) -> tuple[list[str], list]:
    """Queries of varied lengths; with images, every other query has one of varied size."""
    texts, images = [], []
    for i in range(count):
        length = 2 + (i * 7) % 17
        texts.append(" ".join(WORDS[(i + k) % len(WORDS)] for k in range(length)) + "?")
        sized = (56 + (i * 37) % 200, 56 + (i * 53) % 160)
        images.append(make_test_image(*sized, seed=i) if with_images and i % 2 == 0 else None)
    return texts, images


def timed(fn, repeats: int) -> tuple[float, object]:
    result, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        path = build_tiny_checkpoint(scratch, num_hidden_layers=args.layers, emb_budget=args.budget)
        encoder = RGEEncoder.from_pretrained(
            path, device="cpu", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_new_tokens=args.budget
        )
        reference = Reference.load(path, MIN_PIXELS, MAX_PIXELS)
    rows = []
    for name, with_images in (("text-only", False), ("mixed image/text", True)):
        texts, images = workload(args.queries, with_images)
        encoder.encode_query(texts[:4], images=images[:4])  # warm-up
        ref_time, ref_out = timed(
            lambda: [reference.query(t, i, max_new_tokens=args.budget) for t, i in zip(texts, images)], 1
        )
        ref_tokens = [tokens for _, tokens in ref_out]
        generated = sum(len(tokens) for tokens in ref_tokens)
        rows.append(_row(name, "reference (bs=1 generate + forward)", 1, None, ref_time, args.queries, generated, True))
        for batch_size in args.batch_sizes:
            for admission in (False, True):
                elapsed, (_, rationales) = timed(
                    lambda: _encode(encoder, texts, images, batch_size, args.budget, admission), args.repeats
                )
                same = rationales.num_generated_tokens == [len(t) for t in ref_tokens] and list(rationales) == [
                    encoder._rationale_text(t) for t in ref_tokens
                ]
                rows.append(
                    _row(name, "rge encode_query", batch_size, admission, elapsed, args.queries, generated, same)
                )
                rows[-1]["speedup"] = ref_time / elapsed
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "model": {"layers": args.layers, "hidden_size": 64, "budget": args.budget},
        "queries": args.queries,
        "rows": rows,
    }


def _encode(encoder: RGEEncoder, texts, images, batch_size: int, budget: int, admission: bool):
    from rge.inputs import normalize_inputs

    items, _ = normalize_inputs(texts, images)
    tokenized = encoder._tokenize(
        [encoder.checkpoint.template.query(item.text) for item in items], [item.image for item in items]
    )
    return encoder._encode_reasoning(tokenized, batch_size, budget, False, admission=admission)


def _row(workload_name, variant, batch_size, admission, seconds, queries, generated, same) -> dict:
    return {
        "workload": workload_name,
        "variant": variant,
        "batch_size": batch_size,
        "admission": admission,
        "seconds": seconds,
        "queries_per_s": queries / seconds,
        "generated_tokens_per_s": generated / seconds,
        "rationales_equal_reference": same,
        "speedup": 1.0,
    }


def print_table(result: dict) -> None:
    print(
        f"{result['queries']} queries, {result['model']['layers']}-layer tiny model, budget {result['model']['budget']}, "
        f"{result['machine']['threads']} threads, torch {result['machine']['torch']}"
    )
    header = (
        f"{'workload':<17} {'variant':<36} {'bs':>3} {'admit':>5} {'q/s':>8} {'tok/s':>8} {'speedup':>8} {'same':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        admit = "-" if row["admission"] is None else ("yes" if row["admission"] else "no")
        print(
            f"{row['workload']:<17} {row['variant']:<36} {row['batch_size']:>3} {admit:>5} "
            f"{row['queries_per_s']:>8.1f} {row['generated_tokens_per_s']:>8.0f} {row['speedup']:>7.1f}x "
            f"{'yes' if row['rationales_equal_reference'] else 'NO':>5}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/query_path.json"))
    args = parser.parse_args()
    result = run(args)
    print_table(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
