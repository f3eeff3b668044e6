"""Running again into an output folder: a run extended with a larger ``--max-steps`` continues from its last
step, a finished folder is not overwritten unless asked, the log's steps always increase, and skipped rows
are reported on the console."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from rge.cli import main

from ..processes import run_bounded


def _steps(output: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()]


def _checkpoints(output: Path) -> list[str]:
    return sorted(path.name for path in output.glob("checkpoint-*"))


def _options(model: Path, data: Path) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--batch-size", "4", "--max-new-tokens", "2",
            "--learning-rate", "1e-3", "--scheduler", "constant", "--device", "cpu", "--no-tensorboard"]  # fmt: skip


def test_a_run_extended_to_more_steps_continues_from_its_last_step(tiny_path, synthetic_data, tmp_path):
    options = [*_options(tiny_path, synthetic_data), "--save-steps", "2"]
    extended = tmp_path / "extended"
    assert main([*options, "--max-steps", "4", "--output", str(extended)]) == 0
    assert _checkpoints(extended) == ["checkpoint-2", "checkpoint-4"]  # the last step is saved
    assert main([*options, "--max-steps", "6", "--output", str(extended), "--resume"]) == 0
    assert _steps(extended) == [1, 2, 3, 4, 5, 6]  # not 1, 2, 3, 4, 3, 4, 5, 6
    assert main([*options, "--max-steps", "6", "--output", str(tmp_path / "whole")]) == 0
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(extended / "model.safetensors")
    for name, tensor in whole.items():  # a constant learning rate: the same run
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name


def test_a_resumed_run_drops_what_its_log_holds_past_the_checkpoint(tiny_path, synthetic_data, tmp_path):
    options = [*_options(tiny_path, synthetic_data), "--max-steps", "3", "--save-steps", "2", "--output", str(tmp_path)]
    assert main(options) == 0
    assert _checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-3"]  # the last step, not a multiple, too
    shutil.rmtree(tmp_path / "checkpoint-3")  # as if the run had died after logging step 3
    assert main([*options, "--resume"]) == 0
    assert _steps(tmp_path) == [1, 2, 3]


def test_a_finished_output_is_refused_unless_it_is_overwritten(tiny_path, synthetic_data, tmp_path, capsys):
    output = tmp_path / "out"
    run = [*_options(tiny_path, synthetic_data), "--max-steps", "2", "--output", str(output)]
    assert main(run) == 0  # no checkpoints
    model, log = (output / "model.safetensors").read_bytes(), (output / "log.jsonl").read_text()
    capsys.readouterr()
    for again in (run, [*run, "--resume"]):
        assert main(again) == 2
        assert "holds an earlier run (log.jsonl, config.json)" in capsys.readouterr().err
    assert (output / "model.safetensors").read_bytes() == model and (output / "log.jsonl").read_text() == log
    assert main([*run, "--resume", "--overwrite-output-dir"]) == 2
    assert "exclude each other" in capsys.readouterr().err

    assert main([*run, "--overwrite-output-dir", "--max-steps", "3", "--save-steps", "1"]) == 0
    assert _steps(output) == [1, 2, 3] and _checkpoints(output) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert main(run) == 2 and "--resume to continue it, --overwrite-output-dir" in capsys.readouterr().err
    assert main([*run, "--overwrite-output-dir"]) == 0  # the earlier checkpoints go with it
    assert _steps(output) == [1, 2] and _checkpoints(output) == []


def test_skipped_rows_are_reported_on_the_console(tiny_path, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")  # exists, so reading the data accepts it
    rows = [json.dumps({"query": f"question {n}", "positive": f"answer {n}"}) for n in range(4)]
    rows[1] = json.dumps({"query": "question 1", "positive": "answer 1", "query_image": "broken.png"})
    (tmp_path / "rows.jsonl").write_text("\n".join([*rows, "{not json"]) + "\n")
    output = tmp_path / "out"
    command = [sys.executable, "-m", "rge", *_options(tiny_path, tmp_path / "rows.jsonl"), "--max-steps", "2",
               "--output", str(output)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run_bounded(command, 600, check=True, env=env)
    errors = output / "errors.jsonl"
    lines = result.stderr.splitlines()
    assert f"1 of 5 rows cannot be used and are skipped, listed in {errors}" in lines
    assert f"step 1: 1 row left out of the batch, listed in {errors}" in lines
    assert f"step 2: 1 row left out of the batch, listed in {errors}" in lines
    assert lines[-1] == f"3 skipped rows listed in {errors}"
    assert len(errors.read_text().splitlines()) == 3
