"""``--optim``: AdamW, bitsandbytes' AdamW8bit (whose moments are really 8-bit) and Adafactor each train the
tiny model, save their state in checkpoints and resume to the weights of an uninterrupted run; a missing
bitsandbytes is named with the extra that installs it, and its import-time kernel line is not shown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rge import RGEEncoder
from rge.cli import main
from rge.training import TrainingConfig, train


def _config(model, data, output, **settings) -> TrainingConfig:
    options = {"max_steps": 8, "batch_size": 8, "max_new_tokens": 2, "learning_rate": 1e-3, "device": "cpu",
               "progress": False, "tensorboard": False, **settings}  # fmt: skip
    return TrainingConfig(model=str(model), data=[str(data)], output=str(output), **options)


def _losses(output) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optim", ["adamw", "adamw_8bit", "adafactor"])
def test_each_optimiser_lowers_the_loss_of_a_repeated_batch(tiny_path, one_batch, tmp_path, optim):
    output = tmp_path / optim
    train(_config(tiny_path, one_batch, output, optim=optim))
    losses = _losses(output)
    assert losses[-1] < 0.8 * losses[0], losses
    base = RGEEncoder.from_pretrained(tiny_path, device="cpu").model.state_dict()
    trained = RGEEncoder.from_pretrained(output, device="cpu").model.state_dict()
    assert all(not torch.equal(base[name], trained[name]) for name in base if name.endswith("q_proj.weight"))


def test_adamw_8bit_keeps_its_moments_in_8_bits(tiny_path, one_batch, tmp_path):
    output = tmp_path / "out"
    train(_config(tiny_path, one_batch, output, optim="adamw_8bit", max_steps=1, save_steps=1))
    saved = torch.load(output / "checkpoint-1" / "optimizer.pt", weights_only=True)["state"].values()
    # bitsandbytes' state_dict keeps a parameter's quantised state under a key of its own
    moments = [entry.get("__bnb_optimizer_quant_state__", entry) for entry in saved]
    eight_bit = [m for m in moments if m["state1"].dtype == torch.uint8]
    assert all(m["state2"].dtype == torch.uint8 for m in eight_bit)
    # it quantises the moments of every tensor of 4,096 elements and more: most of the model
    assert all(m["state1"].numel() < 4096 for m in moments if m["state1"].dtype != torch.uint8)
    share = sum(m["state1"].numel() for m in eight_bit) / sum(m["state1"].numel() for m in moments)
    assert share > 0.9, share
    weights = load_file(output / "checkpoint-1" / "trainable.safetensors")
    assert sum(m["state1"].numel() for m in moments) <= sum(w.numel() for w in weights.values())


@pytest.mark.parametrize("optim", ["adamw_8bit", "adafactor"])
def test_a_resumed_run_reaches_the_uninterrupted_weights(tiny_path, one_batch, tmp_path, optim):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    settings = {"optim": optim, "scheduler": "constant", "save_steps": 2}
    train(_config(tiny_path, one_batch, whole, max_steps=4, **settings))
    train(_config(tiny_path, one_batch, resumed, max_steps=2, **settings))
    train(_config(tiny_path, one_batch, resumed, max_steps=4, resume=True, **settings))
    assert _losses(resumed) == pytest.approx(_losses(whole), abs=1e-6)
    one, other = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert one.keys() == other.keys()
    for name, tensor in one.items():
        assert torch.allclose(other[name], tensor, atol=1e-6), name
    base = load_file(tmp_path / "resumed" / "checkpoint-2" / "trainable.safetensors")
    assert any(not torch.equal(base[name], load_file(resumed / "checkpoint-4" / "trainable.safetensors")[name])
               for name in base)  # fmt: skip  # the resumed steps trained


def test_resuming_with_another_optimiser_is_refused(tiny_path, one_batch, tmp_path, capsys):
    options = ["train", "--model", str(tiny_path), "--data", str(one_batch), "--output", str(tmp_path / "out"),
               "--max-steps", "1", "--save-steps", "1", "--max-new-tokens", "2", "--device", "cpu",
               "--no-tensorboard"]  # fmt: skip
    assert main([*options, "--optim", "adafactor"]) == 0
    assert main([*options, "--resume", "--max-steps", "2"]) == 2
    assert "holds adafactor's optimiser state" in capsys.readouterr().err


def test_a_missing_bitsandbytes_names_its_extra_before_the_model_loads(tiny_path, one_batch, tmp_path, monkeypatch,
                                                                        capsys):  # fmt: skip
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as when it is not installed
    argv = ["train", "--model", str(tiny_path), "--data", str(one_batch), "--output", str(tmp_path / "out"),
            "--device", "cpu", "--optim", "adamw_8bit"]  # fmt: skip
    assert main(argv) == 5
    said = capsys.readouterr().err
    assert "--optim adamw_8bit needs bitsandbytes" in said and 'pip install "rge-embeddings[train-8bit]"' in said
    assert not (tmp_path / "out").exists()


def test_an_unknown_optimiser_is_refused(tiny_path, one_batch, tmp_path, capsys):
    argv = ["train", "--model", str(tiny_path), "--data", str(one_batch), "--output", str(tmp_path / "out"),
            "--optim", "sgd"]  # fmt: skip
    with pytest.raises(SystemExit):
        main(argv)
    assert "invalid choice: 'sgd'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="optim must be one of adamw, adamw_8bit, adafactor"):
        _config(tiny_path, one_batch, tmp_path / "out", optim="sgd")


@pytest.mark.parametrize("call", ["optimizers import import_bitsandbytes as f", "lora import require_peft as f"])
def test_importing_bitsandbytes_shows_no_line_about_its_4bit_kernel(call):
    """bitsandbytes logs a warning at import on some CPUs about a 4-bit kernel training does not use; rge
    imports it (and peft, which imports it) without that line."""
    after = "import logging; logging.getLogger('bitsandbytes.backends.cpu.ops').warning('kept')"  # still heard
    code = f"from rge.training.{call}; f(); {after}"
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "gemm_4bit" not in said and "kept" in said, said
