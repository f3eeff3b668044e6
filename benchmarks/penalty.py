"""Cost of the repetition penalty per decode step, against the logits it works on (real vocabulary size).

    python benchmarks/penalty.py                    # CPU, fp32
    python benchmarks/penalty.py --device cuda      # bf16 logits as on a GPU

Per batch size: the time of the last-position logits (lm_head of hidden 2048 over 151,936 ids, as in
Qwen2.5-VL-3B), of the penalty over the rows' ids (600-token prompts plus 64 generated tokens, as the
slot cache keeps them: one id per column), and of writing the fed tokens' ids into their column.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rge.engine.decoding_settings import apply_repetition_penalty, row_token_ids  # noqa: E402

VOCAB, HIDDEN, PROMPT = 151_936, 2048, 600


def timed(function, device: torch.device, repeats: int) -> float:
    """Median seconds of ``function`` over ``repeats`` runs (after one warm-up)."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device=device, dtype=dtype)
    print(f"device {device}, {dtype}, vocab {VOCAB}, hidden {HIDDEN}, prompts of {PROMPT} tokens")
    print(f"{'rows':>5} {'logits ms':>10} {'penalty ms':>11} {'write ms':>10} {'penalty/logits':>15}")
    with torch.inference_mode():
        for rows in args.batch_sizes:
            hidden = torch.randn(rows, HIDDEN, device=device, dtype=dtype)
            prompt = torch.randint(0, VOCAB, (rows, PROMPT + 64), device=device)
            ids = row_token_ids(prompt, torch.ones_like(prompt))
            scores = head(hidden).float()
            chosen = scores.argmax(-1)
            column = torch.tensor([PROMPT + 63], device=device)
            logits_s = timed(lambda: head(hidden).float(), device, args.repeats)
            penalty_s = timed(lambda: apply_repetition_penalty(scores, ids, 1.05), device, args.repeats)  # in place
            mark_s = timed(lambda: ids.index_copy_(1, column, chosen[:, None]), device, args.repeats)
            print(f"{rows:>5} {1e3 * logits_s:>10.3f} {1e3 * penalty_s:>11.3f} {1e3 * mark_s:>10.3f} "
                  f"{penalty_s / logits_s:>14.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
