"""Start-up time: how long a fresh interpreter takes to import rge, or to answer ``rge --version`` / ``--help``,
against ``import torch`` alone.

    python benchmarks/startup.py                 # 5 runs of each, the median
    python benchmarks/startup.py --repeats 9

Each run is a new process (``python -c ...`` or ``python -m rge ...``, which is what the ``rge`` command runs),
timed from start to exit, so the interpreter's own start is in every number (``python -c pass`` shows it).
The runs of the different commands take turns, so a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "import rge": ["-c", "import rge"],
    "from rge import RGEEncoder": ["-c", "from rge import RGEEncoder"],
    "rge --version": ["-m", "rge", "--version"],
    "rge --help": ["-m", "rge", "--help"],
}
BASELINE = "import torch"


def run_once(arguments: list[str]) -> float:
    """Seconds a fresh interpreter takes to run ``arguments`` and exit, this checkout's rge first on its path."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    subprocess.run([sys.executable, *arguments], check=True, capture_output=True, cwd=ROOT, env=environment)
    return time.perf_counter() - start


def measure(repeats: int) -> dict[str, float]:
    """The median seconds of each command over ``repeats`` runs, after one unmeasured run of each (warm caches)."""
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for round_number in range(repeats + 1):
        for name, arguments in COMMANDS.items():
            seconds = run_once(arguments)
            if round_number:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="measured runs of each command (default: 5)")
    args = parser.parse_args()
    medians = measure(args.repeats)
    print(f"| command | median s ({args.repeats} runs) | / {BASELINE} |")
    print("|---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| `{name}` | {seconds:.2f} | {seconds / medians[BASELINE]:.2f} |")


if __name__ == "__main__":
    main()
