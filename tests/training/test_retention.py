"""Which checkpoints a run keeps: the newest ``--save-total-limit``, the one it resumed from, and the best on
``--metric-for-best-model`` (recorded in ``trainer_state.json``, and saved as the model with
``--load-best-model-at-end``); settings that cannot work together are refused first."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rge.cli import main


def _options(model: Path, data: Path, output: Path) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(output), "--batch-size", "8",
            "--max-new-tokens", "4", "--learning-rate", "1e-3", "--scheduler", "constant", "--device", "cpu",
            "--report-to", "none"]  # fmt: skip


def _checkpoints(output: Path) -> list[str]:
    return sorted(path.name for path in output.glob("checkpoint-*"))


def test_the_best_checkpoint_is_kept_recorded_and_saved_as_the_model(
    tiny_path, synthetic_data, held_out_data, tmp_path
):
    output, metric = tmp_path / "best", "eval/ndcg@10_reasoning"
    watching = ["--eval-data", str(held_out_data), "--eval-steps", "1", "--save-steps", "1", "--save-total-limit", "1",
                "--metric-for-best-model", metric, "--load-best-model-at-end"]  # fmt: skip
    assert main([*_options(tiny_path, synthetic_data, output), "--max-steps", "4", *watching]) == 0
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    scores = {record["step"]: record[metric] for record in records if metric in record}
    best = max(scores, key=lambda step: (scores[step], -step))  # the highest; a tie: the earlier
    assert 1 < best < 4, scores  # these weights and rows score best before the end, so keeping it shows
    assert json.loads((output / "trainer_state.json").read_text()) == {
        "metric_for_best_model": metric, "greater_is_better": True, "best_checkpoint": f"checkpoint-{best}",
        "best_step": best, "best_metric": scores[best],
    }  # fmt: skip
    assert _checkpoints(output) == [f"checkpoint-{best}", "checkpoint-4"]  # the newest one, and the best

    # The saved model is the best step's: the same run stopped there saves the same weights.
    short = tmp_path / "short"
    assert main([*_options(tiny_path, synthetic_data, short), "--max-steps", str(best)]) == 0
    saved, expected = load_file(output / "model.safetensors"), load_file(short / "model.safetensors")
    assert all(torch.equal(saved[name], tensor) for name, tensor in expected.items())


def test_the_newest_checkpoints_are_kept_and_the_one_resumed_from(tiny_path, synthetic_data, tmp_path):
    options = [*_options(tiny_path, synthetic_data, tmp_path), "--save-steps", "1"]
    assert main([*options, "--max-steps", "3", "--save-total-limit", "2"]) == 0
    assert _checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-3"]
    assert main([*options, "--max-steps", "5", "--save-total-limit", "1", "--resume"]) == 0
    assert _checkpoints(tmp_path) == ["checkpoint-3", "checkpoint-5"]  # resumed from checkpoint-3


def test_settings_that_cannot_keep_a_best_checkpoint_are_refused(
    tiny_path, synthetic_data, held_out_data, tmp_path, capsys
):
    base = [*_options(tiny_path, synthetic_data, tmp_path / "out"), "--max-steps", "2"]
    metric = ["--metric-for-best-model", "eval/recall@1_reasoning"]
    evaluated = ["--eval-data", str(held_out_data), "--eval-steps", "2"]
    for options, said in [
        (metric, "metric_for_best_model needs eval_data"),
        ([*metric, *evaluated, "--save-steps", "3"], "save_steps a multiple of eval_steps"),
        (["--load-best-model-at-end"], "load_best_model_at_end needs metric_for_best_model"),
        (["--eval-steps", "2"], "eval_steps needs eval_data"),
    ]:
        assert main([*base, *options]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
