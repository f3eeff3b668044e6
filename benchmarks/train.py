"""Training throughput of ``rge train`` (samples/s) on random checkpoints, and where a step's time goes.

    python benchmarks/train.py                                    # CPU: tiny and small, full / LoRA / GradCache
    python benchmarks/train.py --sizes tiny --steps 6 --output /tmp/train.json    # a quick look
    python benchmarks/train.py --device cuda --sizes small --batch-size 32        # on a GPU

Each variant trains ``--steps`` steps of ``--batch-size`` examples (texts, a third with images, one
hard negative each, a supervision rationale each) with ``--max-new-tokens`` self-generated rationale
tokens, and reports the median over steps after the first two: samples/s, seconds per step and the
share spent generating rationales (``build_step_batch``: eval-mode greedy decoding, no gradient).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rge.testing import build_tiny_checkpoint, make_test_image  # noqa: E402
from rge.training import TrainingConfig, train  # noqa: E402

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vision_depth": 2},
    "small": {"num_hidden_layers": 8, "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4,
              "intermediate_size": 1376, "vision_depth": 4},
}  # fmt: skip
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "full + GradCache (micro = batch / 4)": {"micro": 4},
    "full + gradient checkpointing": {"gradient_checkpointing": True},
    "LoRA (DoRA r=16)": {"lora": True},
}
SUBJECTS = ["cat", "dog", "tiger", "owl", "horse", "car", "bridge", "kitchen", "river", "mountain", "clock", "tree"]


def write_data(folder: Path, count: int) -> Path:
    picture = folder / "picture.png"
    make_test_image(160, 120, seed=3).save(picture)
    rows = []
    for n in range(count):
        subject = SUBJECTS[n % len(SUBJECTS)]
        rows.append({"query": f"Where is the {subject} number {n} in the picture?", "positive": f"the {subject} {n}",
                     "negatives": [f"the {SUBJECTS[(n + 1) % len(SUBJECTS)]}"], "rationale": f"It is the {subject}.",
                     **({"query_image": picture.name} if n % 3 == 0 else {})})  # fmt: skip
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_variant(checkpoint: Path, data: Path, output: Path, args: argparse.Namespace, options: dict) -> dict:
    micro = args.batch_size // options["micro"] if "micro" in options else None
    config = TrainingConfig(
        model=str(checkpoint), data=[str(data)], output=str(output), max_steps=args.steps,
        batch_size=args.batch_size, micro_batch_size=micro, learning_rate=1e-4, max_new_tokens=args.max_new_tokens,
        lora=options.get("lora", False), gradient_checkpointing=options.get("gradient_checkpointing", False),
        device=args.device, tensorboard=False, progress=False, min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28,
    )  # fmt: skip
    train(config)
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()][2:]
    seconds = statistics.median(record["seconds"] for record in log)
    generation = statistics.median(record["generation_seconds"] for record in log)
    return {"samples_per_second": round(args.batch_size / seconds, 2), "seconds_per_step": round(seconds, 4),
            "generation_share": round(generation / seconds, 3),
            "rationale_tokens": round(statistics.mean(record["rationale_tokens"] for record in log), 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        data = write_data(folder, args.batch_size * args.steps)
        for size in args.sizes:
            checkpoint = build_tiny_checkpoint(folder / f"model-{size}", emb_budget=args.max_new_tokens, **SIZES[size])
            for number, name in enumerate(args.variants):
                result = run_variant(checkpoint, data, folder / f"run-{size}-{number}", args, VARIANTS[name])
                rows.append({"size": size, "variant": name, "batch_size": args.batch_size, **result})
                print(f"{size:6} {name:38} {result['samples_per_second']:8.2f} samples/s  "
                      f"{result['seconds_per_step']:7.3f} s/step  generation {result['generation_share']:.0%}  "
                      f"({result['rationale_tokens']} rationale tokens)", flush=True)  # fmt: skip
    if args.output:
        args.output.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
