"""``rge train`` end to end on a tiny checkpoint: a short run lifts held-out Recall@1 and saves a model
RGEEncoder loads; a run killed after a checkpoint resumes to the weights of an uninterrupted one; two
processes under torchrun train like one process on the whole batch (and the main one evaluates while the other
waits); bad set-ups are refused first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rge import RGEEncoder
from rge.cli import main
from rge.training import TrainingConfig, train

from ..conftest import file_modes
from ..processes import kill_session, run_bounded, start, tail
from .conftest import document_text, query_text, synthetic_split


def _recall_at_1(model: Path, combos: list[tuple[int, ...]]) -> float:
    encoder = RGEEncoder.from_pretrained(model, device="cpu", max_new_tokens=4)
    queries = encoder.encode([query_text(c) for c in combos], reason=True, show_progress_bar=False)
    documents = encoder.encode([document_text(c) for c in combos], reason=False, show_progress_bar=False)
    return float(np.mean((queries @ documents.T).argmax(axis=1) == np.arange(len(combos))))


def test_a_short_run_lifts_held_out_recall_and_saves_a_loadable_model(tiny_path, synthetic_data, tmp_path):
    held_out = synthetic_split()[1]
    before = _recall_at_1(tiny_path, held_out)
    output = tmp_path / "trained"
    config = TrainingConfig(model=str(tiny_path), data=[str(synthetic_data)], output=str(output), max_steps=150,
                            batch_size=16, learning_rate=1e-3, max_new_tokens=4, progress=False)  # fmt: skip
    assert train(config) == output
    after = _recall_at_1(output, held_out)
    assert before < 0.1 and after > 0.3, (before, after)  # chance is 1/60
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == list(range(1, 151))
    assert {"loss", "contrastive", "lm", "accuracy", "learning_rate", "samples_per_second"} <= log[0].keys()
    assert log[-1]["contrastive"] < log[0]["contrastive"] and log[-1]["lm"] < log[0]["lm"]
    accuracy = [record["accuracy"] for record in log]
    assert all(0 <= value <= 1 and (value * 16).is_integer() for value in accuracy), accuracy  # k of 16 queries
    assert np.mean(accuracy[:10]) < 0.5 < np.mean(accuracy[-10:]), accuracy  # it learns the task it is taught
    assert any((output / "tensorboard").iterdir())
    encoder = RGEEncoder.from_pretrained(output, device="cpu")
    assert encoder.checkpoint.tokenizer.convert_tokens_to_ids("<emb>") == encoder.checkpoint.emb_token_id
    assert (output / "generation_config.json").read_bytes() == (tiny_path / "generation_config.json").read_bytes()


def test_no_reasoning_trains_queries_on_the_candidate_path(tiny_path, synthetic_data, tmp_path):
    """``--no-reasoning``: every step's queries are prompt + ``<emb>`` (one token after the prompt, nothing
    decoded), where the same run with reasoning writes rationales."""
    common = ["train", "--model", str(tiny_path), "--data", str(synthetic_data), "--max-steps", "3", "--batch-size",
              "8", "--max-new-tokens", "4", "--device", "cpu", "--no-tensorboard"]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "plain"), "--no-reasoning", "--lm-weight", "0"]) == 0
    assert main([*common, "--output", str(tmp_path / "reasoning")]) == 0
    plain, reasoning = ([json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
                        for name in ("plain", "reasoning"))  # fmt: skip
    assert [line["rationale_tokens"] for line in plain] == [1, 1, 1]
    assert all(line["rationale_tokens"] > 1 for line in reasoning)
    assert all(line["loss"] == line["contrastive"] for line in plain)  # lm_weight 0: InfoNCE only
    RGEEncoder.from_pretrained(tmp_path / "plain", device="cpu")


_BLOCK_AT_STEP_5 = """
import sys, time
import rge.training.trainer as trainer
from rge.cli import main
real, calls = trainer.build_step_batch, []
def build(*args, **kwargs):
    calls.append(1)
    if len(calls) == 5:  # step 5 never finishes: the test kills the process here
        time.sleep(600)
    return real(*args, **kwargs)
trainer.build_step_batch = build
sys.exit(main(sys.argv[1:]))
"""


def _wait_for(done: Callable[[], bool], process: subprocess.Popen, timeout: float, said: Path) -> None:
    """Until ``done()``; the test fails naming what ``process`` wrote to ``said`` when it ends first, or when
    ``timeout`` seconds pass (a bound for a process that is stuck, not a measure of a slow machine)."""
    deadline = time.monotonic() + timeout
    while not done():
        ended, late = process.poll() is not None, time.monotonic() > deadline
        if ended or late:
            why = f"ended with {process.returncode}" if ended else f"still running after {timeout:g} s"
            pytest.fail(f"{process.args[-1]}: {why} before it got there; it wrote:\n{tail(said.read_text())}",
                        pytrace=False)  # fmt: skip
        time.sleep(0.1)


def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tiny_path, synthetic_data, tmp_path):
    # LoRA with dropout (the RNG state matters) and cached gradients (micro-batches), Adam with warm-up.
    options = ["--model", str(tiny_path), "--data", str(synthetic_data), "--batch-size", "6", "--max-steps", "6",
               "--micro-batch-size", "4", "--learning-rate", "5e-3", "--warmup-steps", "2", "--max-new-tokens", "4",
               "--lora", "--lora-r", "4", "--save-steps", "2", "--device", "cpu", "--no-tensorboard"]  # fmt: skip
    assert main(["train", *options, "--output", str(tmp_path / "whole")]) == 0

    killed, said = tmp_path / "killed", tmp_path / "killed.out"
    command = [sys.executable, "-c", _BLOCK_AT_STEP_5, "train", *options, "--output", str(killed)]
    with said.open("w") as out:
        process = start(command, stdout=out, stderr=subprocess.STDOUT)
    try:  # the checkpoint is renamed into place complete, state.json last; a loaded machine only delays it
        _wait_for(lambda: (killed / "checkpoint-4" / "state.json").is_file(), process, 900, said)
    finally:
        kill_session(process)
        process.wait()
    assert not (killed / "model.safetensors").exists()
    assert json.loads((killed / "checkpoint-4" / "state.json").read_text())["step"] == 4

    assert main(["train", *options, "--output", str(killed), "--resume"]) == 0
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert whole.keys() == resumed.keys() and not any("lora" in name for name in whole)  # merged
    for name, tensor in whole.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name
    base = RGEEncoder.from_pretrained(tiny_path, device="cpu").model.state_dict()
    trained = RGEEncoder.from_pretrained(tmp_path / "whole", device="cpu").model.state_dict()
    assert base.keys() == trained.keys()
    changed = [name for name in base if not torch.equal(base[name], trained[name])]
    assert any("q_proj" in name for name in changed) and not any("norm" in name for name in changed)  # LoRA targets
    logs = [(output / "log.jsonl").read_text().splitlines() for output in (tmp_path / "whole", killed)]
    steps = [[json.loads(line)["step"] for line in log] for log in logs]
    assert steps == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]]  # the killed step 5 was never logged


def _torchrun(arguments: list[str], logs: Path, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Two processes under ``torchrun`` (bounded: killed with their launcher after 600 s); the end of each
    one's own output (kept under ``logs``) is in the failure, so that it shows which process was stuck or why."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--log-dir", str(logs), "--redirects", "3", *arguments]  # fmt: skip
    try:
        result = run_bounded(command, 600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if check and result.returncode != 0:
            pytest.fail(f"torchrun exited with {result.returncode}:\n{tail(result.stderr)}", pytrace=False)
    except pytest.fail.Exception as failure:
        pytest.fail(f"{failure}\n{_rank_output(logs)}", pytrace=False)
    return result


def _rank_output(logs: Path) -> str:
    """The end of what each process under ``torchrun --log-dir logs --redirects 3`` wrote, by rank."""
    files = sorted(logs.rglob("*.log"), key=lambda path: (path.parent.name, path.name))
    return "\n".join(f"--- rank {path.parent.name}, {path.name}:\n{tail(path.read_text())}" for path in files)


def test_two_processes_train_like_one_process_on_the_whole_batch(tiny_path, synthetic_data, held_out_data, tmp_path):
    options = ["--model", str(tiny_path), "--data", str(synthetic_data), "--max-steps", "3", "--max-new-tokens", "4",
               "--learning-rate", "1e-3", "--device", "cpu", "--no-tensorboard"]  # fmt: skip
    _torchrun(["-m", "rge.cli", "train", *options, "--batch-size", "4", "--output", str(tmp_path / "two"),
               "--eval-data", str(held_out_data), "--ddp-timeout", "120"], tmp_path / "ranks")  # fmt: skip
    assert main(["train", *options, "--batch-size", "8", "--output", str(tmp_path / "one")]) == 0
    logs = [[json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("one", "two")]  # fmt: skip
    evaluation = logs[1].pop()  # the main process evaluated at the last step while the other waited
    assert evaluation["step"] == 3 and evaluation["eval/rows"] == 30 and "loss" not in evaluation
    for one, two in zip(*logs, strict=True):
        # Step 1 starts from the same weights; later steps from weights Adam moved alike (see below).
        tolerance = 1e-5 if one["step"] == 1 else 1e-3
        for key in ("loss", "contrastive", "lm", "accuracy"):
            assert two[key] == pytest.approx(one[key], rel=tolerance, abs=1e-6), (one["step"], key)
    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    differences = torch.cat([(one[name] - two[name]).abs().flatten() for name in one])
    # Adam turns rounding-level gradient differences of near-zero gradients into whole steps of the
    # learning rate, so a handful of weights may differ; all others agree to rounding.
    assert float((differences > 1e-5).float().mean()) < 1e-3


_RANK_1_FAILS_AT_STEP_2 = """
import os, sys, time
import rge.training.trainer as trainer
from rge.cli import main
real, calls = trainer.build_step_batch, []
def build(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2 and os.environ["RANK"] == "1":
        if sys.argv[1] == "raises":
            raise RuntimeError("rank 1 breaks at step 2")
        time.sleep(600)  # stuck: the other process must not wait for it for ever
    return real(*args, **kwargs)
trainer.build_step_batch = build
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("failure", ["raises", "hangs"])
def test_a_process_that_fails_alone_ends_the_run_with_its_error(tiny_path, synthetic_data, tmp_path, failure):
    """The other process is at a collective of step 2: the launcher ends it when rank 1 raises, and
    ``--ddp-timeout`` makes it raise itself when rank 1 never comes."""
    script = tmp_path / "fails.py"
    script.write_text(_RANK_1_FAILS_AT_STEP_2)
    options = ["train", "--model", str(tiny_path), "--data", str(synthetic_data), "--max-steps", "3",
               "--batch-size", "2", "--max-new-tokens", "2", "--device", "cpu", "--no-tensorboard",
               "--output", str(tmp_path / "out"), "--ddp-timeout", "10"]  # fmt: skip
    result = _torchrun([str(script), failure, *options], tmp_path / "ranks", check=False)
    assert result.returncode != 0, result.stderr[-3000:]
    said = _rank_output(tmp_path / "ranks")
    if failure == "raises":
        assert "RuntimeError: rank 1 breaks at step 2" in said.split("--- rank 1")[1], said
    else:
        assert "timed out" in said.split("--- rank 1")[0].lower(), said  # rank 0's collective gave up
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_bad_set_ups_are_refused_before_training(tiny_path, synthetic_data, tmp_path, capsys):
    base = ["train", "--model", str(tiny_path), "--data", str(synthetic_data), "--device", "cpu", "--no-tensorboard"]
    assert main([*base, "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "a")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "b"), "--lora-dropout", "1.5"]) == 2
    assert "lora_dropout" in capsys.readouterr().err
    run = [*base, "--output", str(tmp_path / "c"), "--max-steps", "2", "--save-steps", "1", "--max-new-tokens", "2"]
    assert main(run) == 0
    assert main(run) == 2  # an earlier run's checkpoints are not overwritten silently
    assert "--resume" in capsys.readouterr().err
    assert main([*run, "--resume", "--batch-size", "4"]) == 2
    assert "batch_size: 8 -> 4" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path), "--data", str(synthetic_data), "--output", str(tmp_path / "d"),
                 "--device", "cpu"]) == 4  # fmt: skip


def test_a_row_that_fails_when_prepared_is_reported_and_training_goes_on(tiny_path, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")  # exists, so reading the data accepts it
    rows = [{"query": f"question {n}", "positive": f"answer {n}"} for n in range(4)]
    rows[1]["query_image"] = "broken.png"
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    config = TrainingConfig(model=str(tiny_path), data=[str(data)], output=str(output), max_steps=2, batch_size=4,
                            max_new_tokens=2, progress=False, tensorboard=False)  # fmt: skip
    train(config)
    errors = [json.loads(line) for line in (output / "errors.jsonl").read_text().splitlines()]
    assert {(error["line"], error["step"]) for error in errors} == {(2, 1), (2, 2)}  # in both steps' batch
    assert all("broken.png" in error["error"] for error in errors)
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2]
    # Accuracy is over the three rows left in the batch: k of 3 queries found their positive.
    counts = [record["accuracy"] * 3 for record in log]
    assert all(0 <= count <= 3 and count == pytest.approx(round(count)) for count in counts), log


@pytest.mark.parametrize("mix_tasks", [False, True])
def test_the_run_batches_by_task_unless_told_to_mix(tiny_path, tmp_path, monkeypatch, mix_tasks):
    import rge.training.trainer as trainer

    rows = [{"query": f"q {task} {n}", "positive": f"p {n}", "task": task} for task in "ab" for n in range(8)]
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    batches, real = [], trainer.build_step_batch
    monkeypatch.setattr(trainer, "build_step_batch", lambda e, batch, **k: batches.append(batch) or real(e, batch, **k))
    config = TrainingConfig(model=str(tiny_path), data=[str(data)], output=str(tmp_path / "out"), max_steps=4,
                            batch_size=8, max_new_tokens=2, mix_tasks=mix_tasks, progress=False,
                            tensorboard=False)  # fmt: skip
    train(config)
    task_counts = [len({example.task for example in batch}) for batch in batches]
    assert len(batches) == 4
    assert (max(task_counts) > 1) == mix_tasks


def test_the_trained_model_and_checkpoints_follow_the_umask(tiny_path, tmp_path, umask):
    """Every file of the output (the model's safetensors, a checkpoint's weights) is as readable as the JSON."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"query": f"q {n}", "positive": f"p {n}"}) + "\n" for n in range(4)))
    config = TrainingConfig(model=str(tiny_path), data=[str(data)], output=str(tmp_path / "out"), max_steps=2,
                            batch_size=4, max_new_tokens=2, save_steps=1, progress=False,
                            tensorboard=False)  # fmt: skip
    train(config)
    modes = file_modes(tmp_path / "out")
    assert {"model.safetensors", "config.json", "checkpoint-1/trainable.safetensors"} <= modes.keys()
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_missing_tensorboard_is_said_once(tiny_path, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when TensorBoard is not installed
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"query": f"q {n}", "positive": f"p {n}"}) + "\n" for n in range(4)))
    config = TrainingConfig(model=str(tiny_path), data=[str(data)], output=str(tmp_path / "out"), max_steps=2,
                            batch_size=4, max_new_tokens=2, progress=False)  # fmt: skip
    train(config)
    said = [record for record in caplog.records if record.name == "rge.training"]
    assert [record.getMessage() for record in said] == [
        'TensorBoard is not installed: logging to log.jsonl only (pip install "rge-embeddings[train]" for '
        "TensorBoard; --no-tensorboard or tensorboard=False hides this line)"
    ]
    assert not (tmp_path / "out" / "tensorboard").exists() and (tmp_path / "out" / "log.jsonl").is_file()


def test_a_lora_run_shows_no_deprecation_warning_of_its_libraries(tiny_path, tmp_path):
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps the model: that
    warning is about the two libraries, not the user's code, so a LoRA run does not show it."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"query": f"q {n}", "positive": f"p {n}"}) + "\n" for n in range(4)))
    config = TrainingConfig(model=str(tiny_path), data=[str(data)], output=str(tmp_path / "out"), max_steps=1,
                            batch_size=4, max_new_tokens=2, lora=True, lora_r=4, progress=False,
                            tensorboard=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # over the test settings' filters, as a user's interpreter shows them
        train(config)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning | DeprecationWarning)] == []


def test_a_run_shows_its_own_progress_and_no_library_noise(tiny_path, synthetic_data, tmp_path):
    """Saving the model does not draw transformers' "Writing model shards" bar under the run's own, and
    bitsandbytes' line about its 4-bit CPU kernel (transformers' scheduler module imports peft, which imports
    bitsandbytes when it is installed) is not printed."""
    command = [sys.executable, "-m", "rge.cli", "train", "--model", str(tiny_path), "--data", str(synthetic_data),
               "--output", str(tmp_path / "out"), "--max-steps", "1", "--max-new-tokens", "2", "--device", "cpu",
               "--no-tensorboard"]  # fmt: skip
    said = run_bounded(command, 300, check=True).stderr
    assert "training" in said  # the run's bar
    assert "Writing model shards" not in said and "gemm_4bit" not in said, said
