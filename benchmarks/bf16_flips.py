"""How often greedy rationale tokens flip in bf16: rge's batched decoder against fp32, and against the
authors' batch-1 loop in bf16, on one random-weight model with the same weights in both dtypes.

    python benchmarks/bf16_flips.py --sizes tiny small              # CPU bf16
    python benchmarks/bf16_flips.py --device cuda --sizes 3b        # on a GPU

Rationales run to the budget (random weights never emit <emb>; special tokens are suppressed as in
run.py), so every step is a chance to flip. For each pair it counts the queries whose tokens differ and
the step of their first difference, and gives the fp32 margin (best minus second-best logit) at that
step next to the margins of all steps: a flip needs a margin smaller than the bf16 error of the logits.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import (  # noqa: E402
    PIXELS,
    ForcedSchedule,
    ForceStop,
    banned_ids,
    build_encoder,
    forced_decoder,
    query_workload,
)

from rge.encoder import KV_CACHES, RGEEncoder  # noqa: E402
from rge.testing import QWEN25_VL_CHAT_TEMPLATE  # noqa: E402
from tests.reference import Reference  # noqa: E402


class RecordedMargins:
    """The forced schedule's choice, recording each step's fp32 margin (best minus second best allowed logit)
    by query and token position. It reads the device in the step: eager steps only."""

    def __init__(self, forced: ForcedSchedule, margins: dict[tuple[int, int], float]) -> None:
        self.forced, self.margins, self.keys = forced, margins, {}

    def admit(self, rows: Sequence[int], keys: Sequence[Any]) -> None:
        self.keys.update(zip(rows, keys))
        self.forced.admit(rows, keys)

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        top = self.forced.allowed(scores).topk(2, dim=-1).values
        for row, count, gap in zip(rows.tolist(), counts.tolist(), (top[:, 0] - top[:, 1]).tolist()):
            self.margins[self.keys[row], count] = gap
        return self.forced(scores, rows, counts)


def decode(encoder: RGEEncoder, items: list[Any], args: argparse.Namespace, margins: dict | None = None):
    """rge's decoder (``--kv-cache``); tokens per query and, if asked, each step's fp32 margin (then with the
    dynamic cache and eager steps)."""
    schedule = [0] * len(items)
    if margins is None:
        decoder = forced_decoder(encoder, max_new_tokens=args.budget, batch_size=args.batch_size,
                                 kv_cache=args.kv_cache, schedule=schedule)  # fmt: skip
    else:
        forced = ForcedSchedule(schedule, encoder.checkpoint.emb_token_id, banned_ids(encoder), args.batch_size,
                                encoder.device)  # fmt: skip
        decoder = encoder.query_decoder(args.batch_size, args.budget, kv_cache="dynamic",
                                        choice=RecordedMargins(forced, margins))  # fmt: skip
    result = decoder.run(items)
    return result.generated, result.embeddings


def authors_loop(encoder: RGEEncoder, texts: list[str], images: list[Any], budget: int) -> list[list[int]]:
    from transformers import LogitsProcessorList

    vision = encoder.checkpoint.vision
    reference = Reference(encoder.model, encoder.checkpoint.tokenizer, vision.image_processor,
                          QWEN25_VL_CHAT_TEMPLATE, vision.min_pixels, vision.max_pixels)  # fmt: skip
    tokens = []
    for text, image in zip(texts, images):
        length = reference.inputs(text, image, candidate=False)["input_ids"].shape[1]
        stop = ForceStop([0], length, encoder.checkpoint.emb_token_id, banned_ids(encoder))
        tokens.append(
            reference.query(text, image, max_new_tokens=budget, logits_processor=LogitsProcessorList([stop]))[1]
        )
    return tokens


def compare(a: list[list[int]], b: list[list[int]], margins: dict[tuple[int, int], float]) -> dict[str, Any]:
    """Queries whose tokens differ, where they first differ, and the fp32 margin there."""
    firsts = {
        q: next(i for i, (x, y) in enumerate(zip(s, t)) if x != y) for q, (s, t) in enumerate(zip(a, b)) if s != t
    }
    at_flip = [margins[q, step] for q, step in firsts.items() if (q, step) in margins]
    return {
        "queries_flipped": len(firsts), "queries": len(a),
        "first_flip_step_median": statistics.median(firsts.values()) if firsts else None,
        "tokens_before_first_flip": sum(firsts.values()) + sum(len(s) for q, s in enumerate(a) if q not in firsts),
        "tokens": sum(len(s) for s in a),
        "fp32_margin_at_flip_median": statistics.median(at_flip) if at_flip else None,
        "fp32_margin_at_flip_max": max(at_flip) if at_flip else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/bf16-flips.json"))
    parser.add_argument("--kv-cache", choices=KV_CACHES, default="auto", help="the bf16 decode's cache")
    args = parser.parse_args()
    device, rows = torch.device(args.device), []
    for size in args.sizes:
        fp32 = build_encoder(size, device, torch.float32, args.budget, PIXELS)
        bf16_model = copy.deepcopy(fp32.model).to(torch.bfloat16)  # the same weights, rounded once
        bf16 = RGEEncoder(replace(fp32.checkpoint, model=bf16_model), max_new_tokens=args.budget)
        texts, images = query_workload(args.queries, with_images=True)
        items = fp32.prepare(texts, images, reason=True, max_new_tokens=args.budget)
        margins: dict[tuple[int, int], float] = {}
        fp32_tokens, fp32_vectors = decode(fp32, items, args, margins)
        bf16_tokens, bf16_vectors = decode(bf16, items, args)
        loop_tokens = authors_loop(bf16, texts, images, args.budget)
        same = [q for q in range(len(items)) if fp32_tokens[q] == bf16_tokens[q]]
        cosines = torch.nn.functional.cosine_similarity(fp32_vectors[same].double(), bf16_vectors[same].double())
        all_margins = sorted(margins.values())
        row = {
            "size": size, "device": str(device), "batch_size": args.batch_size, "budget": args.budget,
            "rge bf16 vs rge fp32": compare(fp32_tokens, bf16_tokens, margins),
            "rge bf16 vs authors' loop bf16": compare(loop_tokens, bf16_tokens, margins),
            "authors' loop bf16 vs rge fp32": compare(fp32_tokens, loop_tokens, margins),
            "fp32_margin_p10": all_margins[len(all_margins) // 10], "fp32_margin_median": statistics.median(all_margins),
            "cosine_bf16_vs_fp32_same_tokens_min": float(cosines.min()) if same else None,
        }  # fmt: skip
        rows.append(row)
        for pair in ("rge bf16 vs rge fp32", "rge bf16 vs authors' loop bf16", "authors' loop bf16 vs rge fp32"):
            stats = row[pair]
            print(f"{size:<6} {pair:<32} flipped {stats['queries_flipped']:>3}/{stats['queries']} queries, "
                  f"first flip at step {stats['first_flip_step_median']}, fp32 margin there "
                  f"{stats['fp32_margin_at_flip_median']} (max {stats['fp32_margin_at_flip_max']})")  # fmt: skip
        print(f"{size:<6} fp32 margins over all steps: p10 {row['fp32_margin_p10']:.3g}, median "
              f"{row['fp32_margin_median']:.3g}; cosine bf16 vs fp32 where tokens agree: min "
              f"{row['cosine_bf16_vs_fp32_same_tokens_min']}")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
