"""The vision tower with transformers' per-window attention loop against rge's stacked windows
(``rge/engine/vision_attention.py``), on random models of real shapes, sdpa.

    python benchmarks/vision_windows.py --sizes tiny small
    python benchmarks/vision_windows.py --sizes 3b --device cuda

Per image size: attention calls per image, milliseconds per image (median of ``--repeats``), and whether
both give the same output (they should, bit for bit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention  # noqa: E402
from workloads import SIZES, build_encoder, sync  # noqa: E402

from rge.engine.vision_attention import WindowBatchedVisionAttention, batch_windows  # noqa: E402
from rge.testing import make_test_image  # noqa: E402


def tower(encoder, image, repeats: int) -> tuple[torch.Tensor, int, float]:
    """The vision tower's output for ``image``, its attention calls and median seconds."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batch = encoder.model_batch(encoder.prepare([{"text": "x", "image": image}], reason=False))
    mapping, calls = ALL_ATTENTION_FUNCTIONS._global_mapping, [0]
    original = mapping["sdpa"]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    times, visual = [], encoder.model.model.visual
    with torch.inference_mode():
        for _ in range(repeats + 1):
            calls[0] = 0
            mapping["sdpa"] = counted
            sync(encoder.device)
            start = time.perf_counter()
            output = visual(batch.pixel_values, grid_thw=batch.image_grid_thw)
            sync(encoder.device)
            times.append(time.perf_counter() - start)
            mapping["sdpa"] = original
    output = output.pooler_output if hasattr(output, "pooler_output") else output
    return output, calls[0], statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"{'size':<6} {'image':>10} {'tokens':>7} {'calls: loop':>12} {'stacked':>8} {'ms: loop':>9} "
          f"{'stacked':>8} {'same':>5}")  # fmt: skip
    for size in args.sizes:
        encoder = build_encoder(size, device, dtype, 8, (256 * 28 * 28, 1024 * 28 * 28))  # batches its windows
        modules = [m for m in encoder.model.modules() if isinstance(m, WindowBatchedVisionAttention)]
        for width, height in ((560, 392), (1036, 840)):
            image = make_test_image(width, height, seed=width)
            tokens = encoder.prepare([{"image": image}], reason=False)[0].image.tokens  # type: ignore[union-attr]
            stacked, stacked_calls, stacked_s = tower(encoder, image, args.repeats)
            for module in modules:  # transformers' own class again: its loop over windows
                module.__class__ = Qwen2_5_VLVisionAttention
            looped, looped_calls, looped_s = tower(encoder, image, args.repeats)
            batch_windows(encoder.model)
            print(f"{size:<6} {f'{width}x{height}':>10} {tokens:>7} {looped_calls:>12} {stacked_calls:>8} "
                  f"{1e3 * looped_s:>9.1f} {1e3 * stacked_s:>8.1f} {str(torch.equal(looped, stacked)):>5}")  # fmt: skip


if __name__ == "__main__":
    main()
