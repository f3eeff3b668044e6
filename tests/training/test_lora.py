"""LoRA (``--lora``): from a base model the ``<emb>`` row trains (peft's trainable token rows; a tied head
with it, an untied head its own row) while the rest of the embeddings stay frozen; ``--weights-dtype
bfloat16`` stores the frozen weights in bfloat16 and keeps what trains float32, trains, and exports a model
RGEEncoder loads; a full fine-tune in bfloat16 weights is refused, with the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rge import RGEEncoder
from rge.cli import main
from rge.testing import build_tiny_checkpoint
from rge.training import TrainingConfig, TrainingSetupError, load_training_encoder, train
from rge.training.lora import with_lora

CPU = torch.device("cpu")


def _config(model, data, output, **settings) -> TrainingConfig:
    options = {"max_steps": 8, "batch_size": 8, "max_new_tokens": 2, "learning_rate": 1e-3, "lora": True,
               "lora_r": 4, "device": "cpu", "progress": False, "tensorboard": False, **settings}  # fmt: skip
    return TrainingConfig(model=str(model), data=[str(data)], output=str(output), **options)


def _rows(model) -> list[torch.Tensor]:
    """The input embeddings and, when untied, the output head's rows."""
    matrices = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    return [matrix.detach().clone() for matrix in dict.fromkeys(matrices)]  # a tied head is the same matrix


@pytest.mark.parametrize("tied", [True, False])
def test_lora_from_a_base_model_trains_the_emb_row_only(tiny_base_path, one_batch, tmp_path, tied):
    base = tiny_base_path if tied else build_tiny_checkpoint(tmp_path / "untied", with_emb_token=False,
                                                             tie_word_embeddings=False)  # fmt: skip
    start, added = load_training_encoder(str(base), device=CPU)  # <emb>'s rows start as the mean of the others
    emb, before = start.checkpoint.emb_token_id, _rows(start.model)
    assert added and len(before) == (1 if tied else 2)
    output = tmp_path / "out"
    train(_config(base, one_batch, output, max_steps=3, learning_rate=1e-2, save_steps=3))
    saved = load_file(output / "checkpoint-3" / "trainable.safetensors")
    rows = [saved[name].shape for name in saved if "trainable_tokens" in name]
    assert rows == [(1, before[0].shape[1])] * len(before)  # <emb>'s row of each matrix, no other

    trained = RGEEncoder.from_pretrained(output, device="cpu", max_new_tokens=2)
    assert trained.checkpoint.emb_token_id == emb
    assert (trained.model.lm_head.weight is trained.model.get_input_embeddings().weight) == tied
    for matrix, original in zip(_rows(trained.model), before, strict=True):
        assert not torch.allclose(matrix[emb], original[emb], atol=1e-4)  # trained away from the mean
        assert torch.equal(matrix[:emb], original[:emb]) and torch.equal(matrix[emb + 1 :], original[emb + 1 :])
    assert np.isfinite(trained.encode(["find a"], reason=True, show_progress_bar=False)).all()


def test_bfloat16_weights_store_the_frozen_weights_only_in_bfloat16(tiny_base_path):
    encoder, _ = load_training_encoder(str(tiny_base_path), device=CPU)
    model = encoder.model
    full = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    config = TrainingConfig(model=str(tiny_base_path), data=["rows.jsonl"], output="out", lora=True,
                            weights_dtype="bfloat16")  # fmt: skip
    with_lora(model, config, emb_id=encoder.checkpoint.emb_token_id)
    parameters = dict(model.named_parameters())
    trained = {name for name, parameter in parameters.items() if parameter.requires_grad}
    assert any("lora_A" in name for name in trained) and any("trainable_tokens" in name for name in trained)
    assert {parameters[name].dtype for name in trained} == {torch.float32}
    assert {parameter.dtype for name, parameter in parameters.items() if name not in trained} == {torch.bfloat16}
    frozen = sum(parameters[name].numel() * 2 for name in parameters if name not in trained)
    assert frozen < 0.51 * full  # half of the float32 model, the adapter aside
    assert not any("lm_head" in name for name in parameters)  # still tied: the head's matrix is the embeddings'
    assert config.dtype == "bfloat16"  # bfloat16 weights compute in bfloat16


def test_a_lora_run_in_bfloat16_weights_trains_and_exports_a_loadable_model(tiny_base_path, one_batch, tmp_path):
    output = tmp_path / "out"
    train(_config(tiny_base_path, one_batch, output, weights_dtype="bfloat16"))
    losses = [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-2:]) < 0.9 * losses[0], losses
    saved = load_file(output / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}  # the source's dtype (the tiny's)
    assert not any("lora" in name or "trainable_tokens" in name for name in saved)  # merged
    encoder = RGEEncoder.from_pretrained(output, device="cpu", max_new_tokens=2)
    queries = encoder.encode(["find a", "find b"], reason=True, show_progress_bar=False)
    assert queries.shape == (2, encoder.embedding_dim) and np.isfinite(queries).all()


def test_bfloat16_weights_without_lora_are_refused_with_the_reason(tiny_path, one_batch, tmp_path, capsys):
    with pytest.raises(TrainingSetupError, match="needs LoRA.*1/256 of a weight rounds away"):
        _config(tiny_path, one_batch, tmp_path / "out", lora=False, weights_dtype="bfloat16")
    with pytest.raises(ValueError, match="computes in bfloat16"):
        _config(tiny_path, one_batch, tmp_path / "out", weights_dtype="bfloat16", dtype="float32")
    argv = ["train", "--model", str(tiny_path), "--data", str(one_batch), "--output", str(tmp_path / "out"),
            "--weights-dtype", "bfloat16"]  # fmt: skip
    assert main(argv) == 2
    said = capsys.readouterr().err
    assert "--lora" in said and "float32 weights" in said and not (tmp_path / "out").exists()
