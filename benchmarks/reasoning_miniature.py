"""The paper's claim in miniature: from a tiny base checkpoint, does training with reasoning retrieve better?

    python benchmarks/reasoning_miniature.py --output benchmarks/results/reasoning-miniature.json
    python benchmarks/reasoning_miniature.py --task running-sum --output benchmarks/results/running-sum.json
    python benchmarks/reasoning_miniature.py --steps 40 --evals 2          # a quick look

Two tasks, each written as the JSONL rows ``rge train`` reads (``task`` naming the kind of row) and each with
a held-out set scored by Recall@1 against all its answers.

``--task two-hop``: a hidden world gives each person a city and each city a country. Three kinds of rows:

- ``city``: "Where does kq live?" -> the city "M3"; rationale "kq lives in M3";
- ``country``: "Which country is M3 in?" -> the country "ZUL"; rationale "M3 is in ZUL";
- ``home``: "Which country does kq live in?" -> "ZUL"; rationale "kq lives in M3" (the first hop only).

Every person has a ``city`` row and every city a ``country`` row, but one person per city has no ``home``
row: those composed questions are the held-out set (each hop seen in training, their composition not),
scored against all countries. The premise: in one forward the first lookup must be composed with the second
within a few layers, and for a held-out person that composition was never trained, while a rationale
writes the first hop as tokens, leaving a one-hop lookup at ``<emb>``. It does not resist a one-forward
shortcut as much as that: two layers do compose two lookups, and the tiny model writes a person's city under
the question it learnt it with, not under the composed one (the docs give the numbers).

``--task running-sum``: "Sum of 371942 mod 10?" -> "six" (ten candidates, one per value; chance 0.1);
rationale "301046", the partial sums mod 10. Held out: digit strings no training row has, so a right answer
needs the procedure, not a memorised string. One forward has no shortcut: the sum mod 10 of k digits
depends on every digit at once (change any one and the answer changes), a parity-like function, and
transformers are known to learn such functions poorly in one pass from few examples, while a
chain of thought that writes the intermediate results turns them into steps each of which is easy. Here
each rationale token is a lookup in a 100-entry table (the previous partial sum and the next digit, at a
fixed offset back in the query), which every training row exercises k times, and the last one is the answer.

Arm (a) trains as ``rge train`` does, the paper's objective: self-generated rationales on the query side,
LM loss on the supervision rationales plus InfoNCE. Arm (b) trains the same model on the same rows with the
same steps and learning rate without reasoning (``reasoning=False``, ``--no-reasoning``): queries embed on
the candidate path (prompt + ``<emb>``, one forward), InfoNCE only (``lm_weight=0``; its rows' rationales,
which nothing would read, are dropped so that its steps do not pay for an LM pass weighted 0). Both arms
are evaluated every ``steps / evals`` steps; arm (b), faster per step, then trains on (resuming its
checkpoint) until it has used the seconds arm (a) used, so the two are compared at equal steps and at equal
training time (the steps' own seconds from ``log.jsonl``, evaluations not counted). The seconds are those of
the machine it runs on, shared or not. Each run also reports how often (a)'s own rationales are right.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rge import RGEEncoder  # noqa: E402
from rge.testing import build_tiny_checkpoint  # noqa: E402
from rge.training import TrainingConfig, read_training_data, train  # noqa: E402

MODEL = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 256, "vision_depth": 1}  # fmt: skip
"""The tiny base model: two layers, hidden size 128 (``rge.testing``, no ``<emb>``)."""


@dataclasses.dataclass(frozen=True)
class World:
    """The hidden tables: each person's city, each city's country."""

    city_of: dict[str, str]
    country_of: dict[str, str]
    held_out: frozenset[str]
    """The people whose composed (``home``) question is held out."""


def make_world(countries: int, cities_per_country: int, people_per_city: int, seed: int) -> World:
    rng = random.Random(seed)
    country_names = rng.sample(["".join(letters) for letters in itertools.permutations(string.ascii_uppercase, 3)],
                               countries)  # fmt: skip
    city_names = rng.sample([f"{letter}{digit}" for letter in string.ascii_uppercase for digit in range(10)],
                            countries * cities_per_country)  # fmt: skip
    person_names = rng.sample(["".join(pair) for pair in itertools.permutations(string.ascii_lowercase, 2)],
                              len(city_names) * people_per_city)  # fmt: skip
    country_of = {city: country_names[number % countries] for number, city in enumerate(city_names)}
    city_of = {person: city_names[number % len(city_names)] for number, person in enumerate(person_names)}
    held_out = frozenset(person_names[: len(city_names)])  # one person per city
    return World(city_of, country_of, held_out)


def city_row(world: World, person: str) -> dict[str, str]:
    city = world.city_of[person]
    return {"task": "city", "query": f"Where does {person} live?", "positive": city,
            "rationale": f"{person} lives in {city}"}  # fmt: skip


def country_row(world: World, city: str) -> dict[str, str]:
    country = world.country_of[city]
    return {"task": "country", "query": f"Which country is {city} in?", "positive": country,
            "rationale": f"{city} is in {country}"}  # fmt: skip


def home_row(world: World, person: str) -> dict[str, str]:
    city = world.city_of[person]
    return {"task": "home", "query": f"Which country does {person} live in?", "positive": world.country_of[city],
            "rationale": f"{person} lives in {city}"}  # fmt: skip


def write_rows(folder: Path, rows: list[dict[str, str]], held_out: list[dict[str, str]]) -> tuple[Path, Path]:
    """``train.jsonl`` and ``held-out.jsonl`` in ``folder``."""
    train_file, held_out_file = folder / "train.jsonl", folder / "held-out.jsonl"
    train_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    held_out_file.write_text("".join(json.dumps(row) + "\n" for row in held_out))
    return train_file, held_out_file


def rationales(model: Path, queries: list[str], budget: int) -> list[str]:
    """The trained model's rationales for ``queries``."""
    encoder = RGEEncoder.from_pretrained(model, device="cpu", max_new_tokens=budget)
    _, written = encoder.encode_query(queries, return_rationales=True, show_progress_bar=False)
    return list(written)


class TwoHop:
    """Person -> city -> country; held out: one person per city's composed question."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.world = make_world(args.countries, args.cities_per_country, args.people_per_city, args.seed)

    def write(self, folder: Path) -> tuple[Path, Path]:
        world = self.world
        rows = [city_row(world, person) for person in world.city_of]
        rows += [country_row(world, city) for city in world.country_of]
        rows += [home_row(world, person) for person in world.city_of if person not in world.held_out]
        return write_rows(folder, rows, [home_row(world, person) for person in sorted(world.held_out)])

    def check(self, model: Path, budget: int) -> dict[str, float]:
        """For the held-out people, the share of the trained model's rationales that name their true city: asked
        the held-out composed question, and asked their one-hop ``city`` question (which training had)."""
        people = sorted(self.world.held_out)
        shares = {}
        for name, row in (("home", home_row), ("city", city_row)):
            written = rationales(model, [row(self.world, person)["query"] for person in people], budget)
            right = sum(self.world.city_of[person] in text.split() for person, text in zip(people, written))
            shares[f"held_out_{name}_rationale_names_city"] = round(right / len(people), 3)
        return shares

    def summary(self) -> dict[str, Any]:
        world = self.world
        return {"name": "two-hop", "people": len(world.city_of), "cities": len(world.country_of),
                "candidates": len(set(world.country_of.values())), "held_out": len(world.held_out)}  # fmt: skip

    @staticmethod
    def headline(checked: dict[str, float]) -> str:
        return ("(a)'s rationales that name the held-out person's city: "
                f"{checked['held_out_home_rationale_names_city']:.3f} asked the composed question, "
                f"{checked['held_out_city_rationale_names_city']:.3f} asked where they live")  # fmt: skip


VALUES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""The running-sum task's ten candidates: the answer's name."""


def running_sums(digits: str) -> str:
    """``"371942"`` -> ``"301046"``: each partial sum mod 10, one digit per step."""
    return "".join(str(total % 10) for total in itertools.accumulate(int(digit) for digit in digits))


def sum_row(digits: str) -> dict[str, str]:
    return {"task": "sum", "query": f"Sum of {digits} mod 10?", "positive": VALUES[int(running_sums(digits)[-1])],
            "rationale": running_sums(digits)}  # fmt: skip


class RunningSum:
    """The sum mod 10 of ``--digits`` random digits; held out: digit strings no training row has."""

    def __init__(self, args: argparse.Namespace) -> None:
        rng = random.Random(args.seed)
        strings: set[str] = set()
        while len(strings) < args.train_rows + args.held_out_rows:
            strings.add("".join(rng.choice(string.digits) for _ in range(args.digits)))
        drawn = sorted(strings)
        rng.shuffle(drawn)
        self.held_out, self.train = drawn[: args.held_out_rows], drawn[args.held_out_rows :]

    def write(self, folder: Path) -> tuple[Path, Path]:
        return write_rows(folder, [sum_row(digits) for digits in self.train], [sum_row(d) for d in self.held_out])

    def check(self, model: Path, budget: int) -> dict[str, float]:
        """The share of (a)'s rationales whose last partial sum is the answer, and that are the whole right chain,
        for the held-out strings and for as many training strings."""
        shares = {}
        for name, strings in (("held_out", self.held_out), ("train", self.train[: len(self.held_out)])):
            written = [text.strip() for text in rationales(model, [sum_row(d)["query"] for d in strings], budget)]
            truth = [running_sums(digits) for digits in strings]
            final = sum(text[-1:] == chain[-1] for text, chain in zip(written, truth))
            shares[f"{name}_final_sum_right"] = round(final / len(truth), 3)
            shares[f"{name}_chain_right"] = round(sum(map(str.__eq__, written, truth)) / len(truth), 3)
        return shares

    def summary(self) -> dict[str, Any]:
        return {"name": "running-sum", "digits": len(self.train[0]), "train_rows": len(self.train),
                "candidates": len(VALUES), "held_out": len(self.held_out)}  # fmt: skip

    @staticmethod
    def headline(checked: dict[str, float]) -> str:
        return ("(a)'s rationales on held-out strings: final partial sum right "
                f"{checked['held_out_final_sum_right']:.3f}, whole chain right {checked['held_out_chain_right']:.3f} "
                f"(training strings: {checked['train_final_sum_right']:.3f}, {checked['train_chain_right']:.3f})")  # fmt: skip


TASKS = {"two-hop": TwoHop, "running-sum": RunningSum}


def run_arm(config: TrainingConfig, examples: list[Any] | None = None) -> list[dict[str, Any]]:
    train(config, examples)
    return [json.loads(line) for line in (config.output_dir / "log.jsonl").read_text().splitlines()]


def evaluations(log: list[dict[str, Any]], *, reasoning: bool) -> list[dict[str, Any]]:
    """Each evaluation: its step, the training seconds up to it (steps only), Recall@1 on the arm's query path
    and, with ``reasoning``, the mean rationale length."""
    seconds = list(itertools.accumulate(line["seconds"] for line in log if "loss" in line))
    path = "reasoning" if reasoning else "no_reasoning"
    return [{"step": line["step"], "seconds": round(seconds[line["step"] - 1], 2),
             "recall@1": round(line[f"eval/recall@1_{path}"], 4),
             **({"rationale_tokens_mean": line["eval/rationale_tokens_mean"]} if reasoning else {})}
            for line in log if "eval/rows" in line]  # fmt: skip


def losses(log: list[dict[str, Any]]) -> dict[str, list[float]]:
    """The first and last step's losses (joint, contrastive, LM)."""
    steps = [line for line in log if "loss" in line]
    return {key: [round(steps[0][key], 4), round(steps[-1][key], 4)] for key in ("loss", "contrastive", "lm")}


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Rows at equal steps, and rows pairing each (a) evaluation with the last (b) one within its seconds."""
    b_at = {row["step"]: row for row in b}
    equal_steps = [{"steps": row["step"], "a_seconds": row["seconds"], "a_recall@1": row["recall@1"],
                    "b_seconds": b_at[row["step"]]["seconds"], "b_recall@1": b_at[row["step"]]["recall@1"]}
                   for row in a if row["step"] in b_at]  # fmt: skip
    equal_time = []
    for row in a:
        within = [other for other in b if other["seconds"] <= row["seconds"]]
        match = within[-1] if within else {"step": None, "seconds": None, "recall@1": None}  # none that early
        equal_time.append({"a_steps": row["step"], "a_seconds": row["seconds"], "a_recall@1": row["recall@1"],
                           "b_steps": match["step"], "b_seconds": match["seconds"],
                           "b_recall@1": match["recall@1"]})  # fmt: skip
    return equal_steps, equal_time


DEFAULTS = {"two-hop": {"steps": 600, "max_new_tokens": 16}, "running-sum": {"steps": 1000, "max_new_tokens": 10}}
"""Each task's default steps and rationale budget."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="two-hop")
    parser.add_argument("--steps", type=int, help="steps of arm (a), and of (b) at equal steps (default: the task's)")
    parser.add_argument("--evals", type=int, default=5, help="evaluations over --steps (and as often after)")
    parser.add_argument("--seed", type=int, default=0, help="the task's data, the data order")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.1, help="InfoNCE's (see the docs: not 0.02 here)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (steadier seconds on a shared CPU)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, help="arm (a)'s rationale budget (default: the task's)")
    two_hop = parser.add_argument_group("two-hop")
    two_hop.add_argument("--countries", type=int, default=8)
    two_hop.add_argument("--cities-per-country", type=int, default=3)
    two_hop.add_argument("--people-per-city", type=int, default=2)
    running_sum = parser.add_argument_group("running-sum")
    running_sum.add_argument("--digits", type=int, default=6, help="digits per query")
    running_sum.add_argument("--train-rows", type=int, default=4000, help="distinct training strings")
    running_sum.add_argument("--held-out-rows", type=int, default=200, help="distinct held-out strings")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps % args.evals:
        parser.error("--steps must be a multiple of --evals")
    if args.train_rows + args.held_out_rows > 10**args.digits:
        parser.error(f"--train-rows + --held-out-rows exceeds the {10**args.digits} strings of {args.digits} digits")
    return args


def main() -> None:
    args = parse_args()
    every = args.steps // args.evals
    torch.set_num_threads(args.threads)
    task = TASKS[args.task](args)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        train_file, held_out_file = task.write(folder)
        base = build_tiny_checkpoint(folder / "base", with_emb_token=False, seed=args.seed, **MODEL)
        common = {"model": str(base), "data": [str(train_file)], "max_steps": args.steps,
                  "batch_size": args.batch_size, "learning_rate": args.learning_rate, "warmup_steps": every // 2,
                  "temperature": args.temperature,
                  "scheduler": "constant", "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                  "eval_data": [str(held_out_file)], "eval_steps": every, "save_steps": args.steps,
                  "device": "cpu", "tensorboard": False, "progress": False}  # fmt: skip
        started = time.perf_counter()
        a_log = run_arm(TrainingConfig(**common, output=str(folder / "a")))
        plain = TrainingConfig(**common, output=str(folder / "b"), reasoning=False, lm_weight=0.0)
        unreasoned = [dataclasses.replace(row, rationale=None) for row in read_training_data([train_file])]
        b_log = run_arm(plain, unreasoned)
        checked = task.check(folder / "a", args.max_new_tokens)
        a, b = evaluations(a_log, reasoning=True), evaluations(b_log, reasoning=False)
        if b[-1]["seconds"] < a[-1]["seconds"]:  # (b) trains on until it has used (a)'s seconds
            extended = math.ceil(a[-1]["seconds"] / b[-1]["seconds"] * args.steps * 1.1 / every) * every
            b_log = run_arm(dataclasses.replace(plain, max_steps=extended, resume=True), unreasoned)
            b = evaluations(b_log, reasoning=False)
        total = time.perf_counter() - started
    equal_steps, equal_time = compare(a, b)
    summary = task.summary()
    print(f"{summary['name']}: {summary['held_out']} held-out questions, {summary['candidates']} candidates "
          f"(chance {1 / summary['candidates']:.3f})\n{task.headline(checked)}")  # fmt: skip
    report(equal_steps, equal_time)
    if args.output:
        result = {"settings": {**vars(args), "output": str(args.output), "model": MODEL}, "task": summary,
                  "arms": {"a": {"evaluations": a, "losses": losses(a_log), **checked},
                           "b": {"evaluations": b, "losses": losses(b_log)}},
                  "equal_steps": equal_steps, "equal_time": equal_time, "total_seconds": round(total, 1)}  # fmt: skip
        args.output.write_text(json.dumps(result, indent=2))


def report(equal_steps: list[dict], equal_time: list[dict]) -> None:
    print("\nequal steps\n| steps | (a) s | (a) R@1 | (b) s | (b) R@1 |\n|---:|---:|---:|---:|---:|")
    for row in equal_steps:
        print(f"| {row['steps']} | {row['a_seconds']} | {row['a_recall@1']:.3f} | {row['b_seconds']} | "
              f"{row['b_recall@1']:.3f} |")  # fmt: skip
    print("\nequal training time\n| (a) steps | (a) s | (a) R@1 | (b) steps | (b) s | (b) R@1 |\n"
          "|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for row in equal_time:
        b_recall = "-" if row["b_recall@1"] is None else f"{row['b_recall@1']:.3f}"
        print(f"| {row['a_steps']} | {row['a_seconds']} | {row['a_recall@1']:.3f} | {row['b_steps'] or '-'} | "
              f"{row['b_seconds'] or '-'} | {b_recall} |")  # fmt: skip


if __name__ == "__main__":
    main()
