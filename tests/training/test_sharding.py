"""``rge train --fsdp``: two gloo processes on the CPU with sharded weights, gradients and optimiser state train
like the same two processes with whole copies (DDP), on batches whose processes run different passes (a
rationale, hard negatives or an image on one process and not on the other), with and without cached
gradients; a sharded run resumes from its checkpoint to the weights of an uninterrupted one; the trained
model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rge import RGEEncoder
from rge.cli import main

from .conftest import document_text, query_text, synthetic_split
from .test_trainer import _rank_output, _torchrun


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory, image_paths) -> Path:
    """Letter rows in tasks of four (a batch of two processes holds one task: each process two rows), where
    one row has a rationale, another hard negatives, a third a query image: at every step one process has a
    pass (supervision, a second candidate micro-batch, the vision tower) the other lacks."""
    path = tmp_path_factory.mktemp("uneven") / "letters.jsonl"
    rows = []
    for number, combo in enumerate(synthetic_split()[0][:24]):
        row: dict[str, object] = {"query": query_text(combo), "positive": document_text(combo),
                                  "task": f"letters-{number // 4}"}  # fmt: skip
        if number % 4 == 0:
            row["rationale"] = "so " + document_text(combo)
        if number % 4 == 1:
            row["negatives"] = [document_text(combo[::-1]), document_text(combo[1:])]
        if number % 4 == 2:
            row["query_image"] = image_paths[number % 2]
        rows.append(row)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _options(tiny_path: Path, data: Path, batch_size: int = 2) -> list[str]:
    return ["-m", "rge.cli", "train", "--model", str(tiny_path), "--data", str(data), "--batch-size", str(batch_size),
            "--max-new-tokens", "3", "--learning-rate", "1e-3", "--device", "cpu", "--no-tensorboard",
            "--ddp-timeout", "120"]  # fmt: skip


def _log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


VARIANTS = {
    "whole-batch": [],
    "cached-gradients": ["--micro-batch-size", "1"],
    # The main process evaluates (forwards the others do not run) between steps, and the best checkpoint is
    # loaded at the end, while the main process deletes the others.
    "evaluated-without-reasoning": ["--no-reasoning", "--eval-steps", "1", "--save-steps", "1", "--save-total-limit",
                                    "1", "--metric-for-best-model", "eval/ndcg@10_no_reasoning",
                                    "--load-best-model-at-end"],
}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_sharded_processes_train_like_whole_copies(tiny_path, uneven_data, held_out_data, tmp_path, variant):
    options = [*_options(tiny_path, uneven_data), "--max-steps", "3", *VARIANTS[variant]]
    if variant.startswith("evaluated"):
        options += ["--eval-data", str(held_out_data)]
    one = [*_options(tiny_path, uneven_data, batch_size=4)[2:], "--max-steps", "3"]
    _torchrun([*options, "--fsdp", "--output", str(tmp_path / "fsdp")], tmp_path / "fsdp-ranks")
    _torchrun([*options, "--output", str(tmp_path / "ddp")], tmp_path / "ddp-ranks")
    if variant == "whole-batch":  # and whole copies train like one process on the whole batch (every process joins the
        # gather of hard negatives, also one whose rows have none)
        assert main([*one, "--output", str(tmp_path / "one")]) == 0
        for alone, whole in zip(_log(tmp_path / "one"), _log(tmp_path / "ddp"), strict=True):
            assert alone["loss"] == pytest.approx(whole["loss"], rel=1e-4), alone["step"]
    for sharded, whole in zip(_log(tmp_path / "fsdp"), _log(tmp_path / "ddp"), strict=True):
        assert sharded.keys() == whole.keys(), sharded["step"]
        for key in ("loss", "contrastive", "lm", "grad_norm", "eval/ndcg@10_no_reasoning"):
            if key in whole:
                assert sharded[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), (sharded["step"], key)
    sharded, whole = (load_file(tmp_path / name / "model.safetensors") for name in ("fsdp", "ddp"))
    assert set(sharded) == set(whole)
    differences = torch.cat([(sharded[name] - whole[name]).abs().flatten() for name in whole])
    assert float((differences > 1e-5).float().mean()) < 1e-3
    encoder = RGEEncoder.from_pretrained(tmp_path / "fsdp", device="cpu", max_new_tokens=3)
    vectors = encoder.encode(["find a b c", "A B C"], show_progress_bar=False)
    assert vectors.shape[0] == 2 and torch.allclose(torch.from_numpy(vectors).norm(dim=1), torch.ones(2), atol=1e-4)


def test_a_sharded_run_resumes_to_the_uninterrupted_weights(tiny_path, uneven_data, tmp_path):
    # A constant learning rate: the first leg, told to stop at step 2, steps as the straight run does.
    options = [*_options(tiny_path, uneven_data), "--fsdp", "--save-steps", "2", "--scheduler", "constant"]
    _torchrun([*options, "--max-steps", "4", "--output", str(tmp_path / "straight")], tmp_path / "ranks-1")
    _torchrun([*options, "--max-steps", "2", "--output", str(tmp_path / "resumed")], tmp_path / "ranks-2")
    saved = load_file(tmp_path / "resumed" / "checkpoint-2" / "trainable.safetensors")
    assert saved and all(not name.startswith("_fsdp") for name in saved)  # full tensors under the model's names
    _torchrun([*options, "--max-steps", "4", "--resume", "--output", str(tmp_path / "resumed")], tmp_path / "ranks-3")
    assert [row["step"] for row in _log(tmp_path / "resumed")] == [1, 2, 3, 4]
    straight, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "resumed"))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


def test_a_run_resumes_only_as_it_was_sharded(tiny_path, uneven_data, tmp_path):
    options = [*_options(tiny_path, uneven_data), "--save-steps", "1", "--output", str(tmp_path / "out")]
    _torchrun([*options, "--max-steps", "1"], tmp_path / "ranks-1")
    result = _torchrun([*options, "--max-steps", "2", "--resume", "--fsdp"], tmp_path / "ranks-2", check=False)
    assert result.returncode != 0
    assert "trained without --fsdp; resume it the same way" in _rank_output(tmp_path / "ranks-2")


def test_sharding_is_refused_where_it_cannot_run(tiny_path, synthetic_data, tmp_path, capsys):
    base = ["train", "--model", str(tiny_path), "--data", str(synthetic_data), "--device", "cpu", "--fsdp"]
    assert main([*base, "--output", str(tmp_path / "a"), "--lora"]) == 2
    assert "LoRA" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "c"), "--optim", "adafactor"]) == 2
    assert "adamw" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "b"), "--max-steps", "1"]) == 2  # one process: nothing to shard
    assert "torchrun" in capsys.readouterr().err
