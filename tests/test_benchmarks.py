"""The benchmark suite runs, and its variants do the same work: identical tokens for every query."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from .processes import run_bounded

ROOT = Path(__file__).parents[1]
SCRIPT_TIMEOUT = 600.0
"""Seconds a benchmark script (tiny shapes, on the CPU) may run before the test fails: several times what it takes."""


def test_benchmark_suite_runs_and_variants_agree(tmp_path):
    output = tmp_path / "bench.json"
    run_bounded(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--sizes", "tiny", "--queries", "6", "--documents", "8",
         "--batch-sizes", "1", "4", "--budget", "8", "--output", str(output)],
        timeout=SCRIPT_TIMEOUT, check=True, cwd=ROOT,
    )  # fmt: skip
    result = json.loads(output.read_text())
    variants = {(row["variant"], row["batch_size"]) for row in result["query"]}
    assert {("reference", 1), ("batched generate", 4), ("rge", 4), ("rge + admission", 4)} <= variants
    assert all(row["same_tokens"] for row in result["query"])
    cosines = [row["min_cosine_vs_generate"] for row in result["query"] if row["variant"].startswith("rge")]
    assert cosines and min(cosines) >= 0.9999  # the careful batched-generate baseline gets rge's vectors
    assert len({row["workload"] for row in result["query"]}) == 3
    authors, rge = result["candidates"]
    assert authors["variant"].startswith("authors'") and rge["variant"].startswith("rge")
    assert 0 < rge["padded_share"] < authors["padded_share"]  # length-sorted, not padded to a multiple of 32


@pytest.mark.parametrize("kv_cache", ["static", "preallocated", "dynamic"])
def test_gpu_mode_runs_its_floor_analysis_with_every_cache(tmp_path, kv_cache):
    """The GPU mode's code (3-D floor analysis, first calls timed apart, bf16) run here at a tiny size, with
    each cache (static is the CUDA default: its slot cache's bytes are measured too)."""
    output = tmp_path / "gpu.json"
    run_bounded(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--mode", "gpu", "--device", "cpu", "--sizes", "tiny",
         "--queries", "4", "--documents", "4", "--batch-sizes", "1", "4", "--budget", "4", "--floor-batch", "4",
         "--kv-cache", kv_cache, "--output", str(output)],
        timeout=SCRIPT_TIMEOUT, check=True, cwd=ROOT,
    )  # fmt: skip
    result = json.loads(output.read_text())
    assert "bfloat16" in result["machine"] and {row["workload"] for row in result["query"]} == {"mixed, varied"}
    rge_rows = [row for row in result["query"] if row["variant"].startswith("rge")]
    assert rge_rows and all(row["peak_kv_mib"] > 0 and row["same_tokens"] for row in rge_rows)
    floor = result["floor"]
    assert floor["batch_size"] == 4 and floor["queries"] == 16 and 0 < floor["full_steps"] <= floor["decode_steps"]
    assert floor["decode_ms_p90"] >= floor["decode_ms_median"] > 0 and floor["decode_floor_ms_median"] > 0
    assert floor["prefill_tokens"] > 0 and floor["prefill_ratio_median"] > 0


def test_training_benchmark_runs_every_variant(tmp_path):
    output = tmp_path / "train.json"
    run_bounded(
        [sys.executable, str(ROOT / "benchmarks" / "train.py"), "--sizes", "tiny", "--steps", "3", "--batch-size", "4",
         "--max-new-tokens", "4", "--output", str(output)],
        timeout=SCRIPT_TIMEOUT, check=True, cwd=ROOT,
    )  # fmt: skip
    rows = json.loads(output.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["full", "full + GradCache (micro = batch / 4)",
                                                "full + gradient checkpointing", "LoRA (DoRA r=16)"]  # fmt: skip
    assert all(row["samples_per_second"] > 0 and 0 < row["generation_share"] < 1 for row in rows)


def test_vllm_route_saves_a_checkpoint_rge_loads_and_says_when_vllm_is_missing(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import vllm_route
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from rge import RGEEncoder

    folder = vllm_route.save_random("tiny", tmp_path / "tiny", budget=4)
    encoder = RGEEncoder.from_pretrained(folder, device="cpu", max_new_tokens=4)
    texts, images = vllm_route.query_workload(2, with_images=True)
    requests = vllm_route.prompts(encoder, texts, images)
    assert requests[0]["prompt"].count("<|image_pad|>") == 1 and "multi_modal_data" in requests[0]
    assert "multi_modal_data" not in requests[1] and requests[1]["prompt"].endswith("<|im_start|>assistant\n")
    assert encoder.encode_query(texts, images=images).shape == (2, encoder.model.config.text_config.hidden_size)
    # Whether or not vLLM is installed here, the script run where it cannot be imported says so and stops.
    without_vllm = ("import runpy, sys; sys.modules['vllm'] = None; sys.argv = sys.argv[1:]; "
                    "runpy.run_path(sys.argv[0], run_name='__main__')")  # fmt: skip
    done = run_bounded([sys.executable, "-c", without_vllm, str(ROOT / "benchmarks" / "vllm_route.py"), "--model",
                        str(folder)], timeout=SCRIPT_TIMEOUT, cwd=ROOT)  # fmt: skip
    assert done.returncode == 2 and "vLLM is not installed" in done.stderr, done.stderr


def test_bf16_flip_benchmark_compares_the_three_pairs(tmp_path):
    output = tmp_path / "flips.json"
    run_bounded(
        [sys.executable, str(ROOT / "benchmarks" / "bf16_flips.py"), "--sizes", "tiny", "--queries", "6",
         "--budget", "6", "--batch-size", "4", "--output", str(output)],
        timeout=SCRIPT_TIMEOUT, check=True, cwd=ROOT,
    )  # fmt: skip
    (row,) = json.loads(output.read_text())["rows"]
    pairs = ["rge bf16 vs rge fp32", "rge bf16 vs authors' loop bf16", "authors' loop bf16 vs rge fp32"]
    for pair in pairs:
        stats = row[pair]
        flipped, before = stats["queries_flipped"], stats["tokens_before_first_flip"]
        assert stats["queries"] == 6 and stats["tokens"] == 36  # the forced schedule: every rationale to budget
        # A flipped query counts the tokens before its first flip (0 to 5), the others all 6 of theirs.
        assert 36 - 6 * flipped <= before <= 36 - flipped, stats
        assert (
            (stats["first_flip_step_median"] is None) == (stats["fp32_margin_at_flip_median"] is None) == (flipped == 0)
        ), stats
        if flipped in (1, 2):  # the median of one or two first-flip steps is their mean
            assert before == 36 - flipped * (6 - stats["first_flip_step_median"]), stats
        if flipped:  # a flip needs a small fp32 margin: smaller than most steps have
            assert stats["fp32_margin_at_flip_median"] <= stats["fp32_margin_at_flip_max"] < row["fp32_margin_median"]
    flips = [row[pair]["queries_flipped"] for pair in pairs]
    assert flips[2] <= flips[0] + flips[1]  # a query on which the loop and fp32 differ differs in one of the others
    if row["cosine_bf16_vs_fp32_same_tokens_min"] is not None:  # the same tokens in bf16: nearly the same vector
        assert row["cosine_bf16_vs_fp32_same_tokens_min"] >= 0.99
    assert (row["cosine_bf16_vs_fp32_same_tokens_min"] is None) == (flips[0] == 6)


def test_the_gpu_check_runs_end_to_end_with_tiny_shapes_on_the_cpu(tmp_path):
    """``benchmarks/gpu_check.sh``: the same steps a GPU session runs (tests on the device, the GPU benchmark,
    the caches compared, bf16 flips), here with tiny shapes, each under its timeout, results in one folder."""
    env = {**os.environ, "RGE_CHECK_DEVICE": "cpu", "RGE_CHECK_QUICK": "1"}
    done = run_bounded(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "check")], env=env,
                       timeout=SCRIPT_TIMEOUT, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "check" / "summary.txt").read_text().splitlines()
    assert summary == ["tests: exit 0", "run: exit 0", "kv_cache: exit 0", "bf16_flips: exit 0"]
    assert json.loads((tmp_path / "check" / "run.json").read_text())["floor"]["decode_steps"] > 0
    assert "passed" in (tmp_path / "check" / "tests.log").read_text()
    assert (tmp_path / "check" / "bf16-flips.json").is_file() and (tmp_path / "check" / "machine.txt").is_file()


def test_startup_benchmark_times_every_command_against_import_torch():
    done = run_bounded([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--repeats", "1"], 300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2:4] for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"python -c pass", "import torch", "import rge", "from rge import RGEEncoder",
                         "rge --version", "rge --help"}  # fmt: skip
    assert float(rows["import torch"][1]) == 1.0 and all(float(seconds) > 0 for seconds, _ in rows.values())


def test_reasoning_miniature_trains_both_arms_and_compares_them(tmp_path):
    """``benchmarks/reasoning_miniature.py`` at a tiny size: both arms train from the base model and are evaluated
    at each step count; (b) trains on to (a)'s seconds. Which arm wins is what the script measures, not tested."""
    output = tmp_path / "miniature.json"
    run_bounded(
        [sys.executable, str(ROOT / "benchmarks" / "reasoning_miniature.py"), "--steps", "6", "--evals", "2",
         "--max-new-tokens", "4", "--countries", "3", "--cities-per-country", "2", "--output", str(output)],
        timeout=SCRIPT_TIMEOUT, check=True, cwd=ROOT,
    )  # fmt: skip
    result = json.loads(output.read_text())
    assert result["task"] == {"name": "two-hop", "people": 12, "cities": 6, "candidates": 3, "held_out": 6}
    a, b = result["arms"]["a"], result["arms"]["b"]
    assert [row["step"] for row in a["evaluations"]] == [3, 6] and [row["step"] for row in b["evaluations"]][:2] == [
        3,
        6,
    ]
    for arm in (a, b):
        assert all(0 <= row["recall@1"] <= 1 and row["seconds"] > 0 for row in arm["evaluations"])
        first, last = arm["losses"]["contrastive"]
        assert first > 0 and last > 0
    assert a["losses"]["lm"][1] < a["losses"]["lm"][0]  # (a) learns to write its rationales
    assert b["losses"]["loss"] == b["losses"]["contrastive"]  # (b): InfoNCE only
    assert 0 <= a["held_out_home_rationale_names_city"] <= 1
    assert [row["steps"] for row in result["equal_steps"]] == [3, 6]
    assert [row["a_steps"] for row in result["equal_time"]] == [3, 6]
    assert len(b["evaluations"]) >= len(a["evaluations"])  # (b), faster per step, may train on past (a)'s steps


def test_reasoning_miniature_running_sum_task_reports_both_arms_and_the_rationales(tmp_path):
    """``--task running-sum`` at a tiny size: held-out digit strings no training row has, both arms evaluated at
    each step count, and the share of (a)'s rationales whose last partial sum (and whole chain) is right."""
    output = tmp_path / "running-sum.json"
    run_bounded(
        [sys.executable, str(ROOT / "benchmarks" / "reasoning_miniature.py"), "--task", "running-sum", "--steps", "6",
         "--evals", "2", "--digits", "3", "--train-rows", "40", "--held-out-rows", "8", "--output", str(output)],
        timeout=SCRIPT_TIMEOUT, check=True, cwd=ROOT,
    )  # fmt: skip
    result = json.loads(output.read_text())
    assert result["task"] == {"name": "running-sum", "digits": 3, "train_rows": 40, "candidates": 10, "held_out": 8}
    assert result["settings"]["max_new_tokens"] == 10  # the task's default budget
    a, b = result["arms"]["a"], result["arms"]["b"]
    assert [row["step"] for row in a["evaluations"]] == [3, 6] and [row["step"] for row in b["evaluations"]][:2] == [
        3,
        6,
    ]
    assert all(0 <= row["recall@1"] <= 1 and row["seconds"] > 0 for arm in (a, b) for row in arm["evaluations"])
    assert b["losses"]["loss"] == b["losses"]["contrastive"]  # (b): InfoNCE only
    for key in ("held_out_final_sum_right", "held_out_chain_right", "train_final_sum_right", "train_chain_right"):
        assert 0 <= a[key] <= 1
    assert a["held_out_chain_right"] <= a["held_out_final_sum_right"]  # a right chain ends on the right sum
    assert [row["steps"] for row in result["equal_steps"]] == [3, 6]
    assert [row["a_steps"] for row in result["equal_time"]] == [3, 6]


def test_reasoning_miniature_refuses_more_running_sum_rows_than_distinct_strings():
    """3 digits make 1,000 distinct strings: asking for more rows is an error, not a search that never ends."""
    result = run_bounded(
        [sys.executable, str(ROOT / "benchmarks" / "reasoning_miniature.py"), "--task", "running-sum", "--digits", "3",
         "--train-rows", "900", "--held-out-rows", "101"],
        timeout=SCRIPT_TIMEOUT, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and "exceeds the 1000 strings of 3 digits" in result.stderr
