"""``--dtype``: bfloat16 is honoured on the CPU (autocast), float16 trains on CUDA with a gradient scaler and
is refused elsewhere, before anything is loaded or written."""

from __future__ import annotations

import json

import pytest
import torch

from rge.cli import main
from rge.training import Precision, TrainingConfig, TrainingSetupError, train, training_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [(None, CPU, torch.float32), (None, CUDA, torch.bfloat16), ("bfloat16", CPU, torch.bfloat16),
     ("float32", CUDA, torch.float32), ("float16", CUDA, torch.float16)],
)  # fmt: skip
def test_the_precision_of_each_dtype_and_device(dtype, device, expected):
    precision = training_precision(dtype, device)
    assert precision == Precision(expected, device.type)
    assert precision.scaled == (expected == torch.float16)  # only float16 needs its loss scaled


@pytest.mark.parametrize(
    ("dtype", "device", "said"),
    [("float16", CPU, "float16 training needs CUDA"), ("bfloat16", torch.device("mps"), "computes in float32"),
     ("float64", CPU, "float32, bfloat16 or float16")],
)  # fmt: skip
def test_what_training_cannot_honour_is_refused(dtype, device, said):
    with pytest.raises(TrainingSetupError, match=said):
        training_precision(dtype, device)


def test_float16_on_the_cpu_is_refused_before_anything_is_written(tiny_path, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    argv = ["train", "--model", str(tiny_path), "--data", str(data), "--output", str(tmp_path / "out"),
            "--device", "cpu", "--dtype", "float16"]  # fmt: skip
    assert main(argv) == 2
    assert "float16 training needs CUDA" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_gradient_scaler_is_active_for_float16_only():
    assert Precision(torch.bfloat16, "cpu").scaler().is_enabled() is False
    assert Precision(torch.float32, "cpu").scaler().is_enabled() is False
    if torch.cuda.is_available():
        assert Precision(torch.float16, "cuda").scaler().is_enabled()


def test_bfloat16_on_the_cpu_trains_in_bfloat16(tiny_path, synthetic_data, tmp_path):
    def first_loss(dtype: str) -> float:
        config = TrainingConfig(model=str(tiny_path), data=[str(synthetic_data)], output=str(tmp_path / dtype),
                                max_steps=1, batch_size=4, max_new_tokens=2, device="cpu", dtype=dtype,
                                progress=False, tensorboard=False)  # fmt: skip
        train(config)
        return json.loads((tmp_path / dtype / "log.jsonl").read_text())["loss"]

    full, half = first_loss("float32"), first_loss("bfloat16")
    assert half != full and half == pytest.approx(full, rel=0.05)  # the same step, rounded to bfloat16
