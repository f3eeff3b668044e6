"""The benchmark suite runs, and its variants do the same work: identical tokens for every query."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_benchmark_suite_runs_and_variants_agree(tmp_path):
    output = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--sizes", "tiny", "--queries", "6", "--documents", "8",
         "--batch-sizes", "1", "4", "--budget", "8", "--output", str(output)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    result = json.loads(output.read_text())
    variants = {(row["variant"], row["batch_size"]) for row in result["query"]}
    assert {("reference", 1), ("batched generate", 4), ("rge", 4), ("rge + admission", 4)} <= variants
    assert all(row["same_tokens"] for row in result["query"])
    cosines = [row["min_cosine_vs_generate"] for row in result["query"] if row["variant"].startswith("rge")]
    assert cosines and min(cosines) >= 0.9999  # the careful batched-generate baseline gets rge's vectors
    assert len({row["workload"] for row in result["query"]}) == 3
    assert [row["variant"].split()[0] for row in result["candidates"]] == ["authors'", "rge"]
    assert all(0.0 <= row["padded_share"] < 1.0 for row in result["candidates"])


def test_training_benchmark_runs_every_variant(tmp_path):
    output = tmp_path / "train.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train.py"), "--sizes", "tiny", "--steps", "3", "--batch-size", "4",
         "--max-new-tokens", "4", "--output", str(output)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    rows = json.loads(output.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["full", "full + GradCache (micro = batch / 4)",
                                                "full + gradient checkpointing", "LoRA (DoRA r=16)"]  # fmt: skip
    assert all(row["samples_per_second"] > 0 and 0 < row["generation_share"] < 1 for row in rows)
