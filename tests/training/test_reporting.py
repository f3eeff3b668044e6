"""Where a run's log goes besides ``log.jsonl``: ``--report-to`` names TensorBoard, W&B or none; a named one that
is not installed stops the run before anything is loaded; without it, TensorBoard is used when installed."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

from rge.cli import main


def _options(model: Path, data: Path, output: Path) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(output), "--batch-size", "4",
            "--max-steps", "2", "--max-new-tokens", "2", "--device", "cpu"]  # fmt: skip


def test_a_named_reporter_that_is_not_installed_stops_the_run_first(
    tiny_path, synthetic_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    for name, extra in (("wandb", "wandb"), ("tensorboard", "train")):
        output = tmp_path / name
        assert main([*_options(tiny_path, synthetic_data, output), "--report-to", name]) == 5
        error = capsys.readouterr().err
        assert error == f'rge train: --report-to {name} needs {name}: pip install "rge-embeddings[{extra}]"\n'
        assert not output.exists()  # nothing was loaded or written
    both = ["--report-to", "tensorboard", "--no-tensorboard"]
    assert main([*_options(tiny_path, synthetic_data, tmp_path / "c"), *both]) == 2
    assert "contradict" in capsys.readouterr().err
    assert main([*_options(tiny_path, synthetic_data, tmp_path / "d"), "--report-to", "none", "wandb"]) == 2
    assert "none goes alone" in capsys.readouterr().err


def test_report_to_none_logs_to_log_jsonl_only(tiny_path, synthetic_data, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not even a line saying it is missing
    output = tmp_path / "out"
    assert main([*_options(tiny_path, synthetic_data, output), "--report-to", "none"]) == 0
    assert not (output / "tensorboard").exists() and (output / "log.jsonl").is_file()
    assert not [record for record in caplog.records if "TensorBoard" in record.getMessage()]


class _WandbRun:
    """What ``wandb.init`` returns, as far as a run uses it: ``log`` and ``finish``."""

    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        self.calls.append(("log", (step, data)))

    def finish(self) -> None:
        self.calls.append(("finish", None))


def test_wandb_gets_the_steps_and_evaluations(tiny_path, synthetic_data, tmp_path, monkeypatch):
    calls: list[tuple[str, Any]] = []
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **options: calls.append(("init", options)) or _WandbRun(calls)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("".join(json.dumps({"query": f"q {n}", "positive": f"p {n}"}) + "\n" for n in range(4)))
    output = tmp_path / "out"
    options = [*_options(tiny_path, synthetic_data, output), "--report-to", "wandb", "--eval-data", str(held_out)]
    assert main(options) == 0
    (_, init), *logged, (last, _) = calls
    assert init["dir"] == str(output) and init["name"] == "out" and init["config"]["report_to"] == ["wandb"]
    assert last == "finish" and not (output / "tensorboard").exists()
    steps = [(step, data) for _, (step, data) in logged]
    assert [step for step, _ in steps] == [1, 2, 2]  # each step, then the evaluation at the last
    assert {"train/loss", "train/accuracy", "train/learning_rate"} <= steps[0][1].keys()
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert steps[2][1] == {name: value for name, value in records[2].items() if name.startswith("eval/")}
