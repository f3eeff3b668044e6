"""The query path with transformers' DynamicCache against rge's preallocated SlotCache (and its fixed-shape
steps, which CUDA replays as graphs), on random models.

    python benchmarks/kv_cache.py --sizes tiny small --repeats 3
    python benchmarks/kv_cache.py --device cuda --sizes 3b --profile-dir prof   # + where a run's time goes

Same forced rationale schedule as benchmarks/run.py (random weights never emit <emb>); checks that both
caches generate the same tokens, and prints queries/s, the median decode step and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import (  # noqa: E402
    build_encoder,
    forced_decoder,
    query_workload,
    stop_schedule,
    sync,
    timed,
)


def timed_run(encoder, tokenized, schedule, batch_size: int, budget: int):
    """One run of the encoder's decoder (its ``kv_cache``); tokens, seconds and the median decode step."""
    steps: list[float] = []
    decoder = timed(forced_decoder(encoder, max_new_tokens=budget, batch_size=batch_size, schedule=schedule),
                    encoder.device, on_step=lambda shape, seconds, running: steps.append(seconds))  # fmt: skip
    start = time.perf_counter()
    result = decoder.run(tokenized)
    sync(encoder.device)
    return result.generated, time.perf_counter() - start, statistics.median(steps)


def profiled_run(encoder, tokenized, schedule, batch_size: int, budget: int, table: Path) -> str:
    """One untimed run (no per-step syncs) under torch.profiler: the kernels' busy time against the wall
    clock, per step, as a line; the operators by their own device (or CPU) time in ``table``."""
    from torch.profiler import ProfilerActivity, profile

    decoder = forced_decoder(encoder, max_new_tokens=budget, batch_size=batch_size, schedule=schedule)
    cuda = encoder.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(encoder.device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        decoder.run(tokenized)
        sync(encoder.device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table.write_text(events.table(sort_by=sort, row_limit=40, max_name_column_width=70))
    kernels = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(event.device_time_total for event in kernels) / 1e6 if cuda else float("nan")
    steps = budget  # the forced schedule's longest rationale sets the number of decode steps
    return (
        f"wall {1e3 * wall:.1f} ms, kernels busy {1e3 * busy:.1f} ms ({busy / wall:.0%}); "
        f"per decode step at most {1e3 * wall / steps:.2f} ms wall, {1e3 * busy / steps:.2f} ms kernels"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kv-cache", nargs="+", choices=("dynamic", "preallocated", "static"),
                        default=["dynamic", "preallocated", "static"], help="the caches to compare (the first is "
                        "the one the others' tokens are checked against)")  # fmt: skip
    parser.add_argument("--profile-dir", type=Path, help="also profile one run of each cache: a line each "
                        "here, the top operators in this folder")  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"{'size':<6} {'workload':<8} {'cache':<12} {'queries/s':>10} {'step ms':>8} {'same tokens':>12}")
    for size in args.sizes:
        encoder = build_encoder(size, device, dtype, args.budget, (4 * 28 * 28, 64 * 28 * 28))
        for workload, with_images in (("text", False), ("mixed", True)):
            texts, images = query_workload(args.queries, with_images)
            schedule = stop_schedule(args.queries, args.budget, "varied")
            tokenized = encoder.prepare(texts, images, reason=True, max_new_tokens=args.budget)
            results = {}
            for name in args.kv_cache:
                encoder.kv_cache = name
                timed_run(encoder, tokenized, schedule, args.batch_size, args.budget)  # warm-up (graph capture)
                runs = [timed_run(encoder, tokenized, schedule, args.batch_size, args.budget)
                        for _ in range(args.repeats)]  # fmt: skip
                results[name] = runs[-1][0]
                seconds = statistics.median(run[1] for run in runs)
                step = statistics.median(run[2] for run in runs)
                same = results[name] == results[args.kv_cache[0]]
                print(f"{size:<6} {workload:<8} {name:<12} {args.queries / seconds:>10.1f} {1e3 * step:>8.2f} "
                      f"{'yes' if same else 'NO':>12}")  # fmt: skip
                if args.profile_dir:
                    args.profile_dir.mkdir(parents=True, exist_ok=True)
                    table = args.profile_dir / f"{size}-{workload}-{name}.txt"
                    line = profiled_run(encoder, tokenized, schedule, args.batch_size, args.budget, table)
                    print(f"  profile: {line}")


if __name__ == "__main__":
    main()
