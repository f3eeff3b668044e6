"""Training from the base model: ``rge train`` on a plain Qwen2.5-VL-Instruct checkpoint adds ``<emb>`` (a
spare padded row, else a resized vocabulary; the mean row; tied heads stay tied, untied ones get their row)
and saves an RGE checkpoint; an RGE checkpoint is loaded as it is. End to end: a base model trained on an
MMEB-train snapshot, watched on held-out rows, gives a model ``RGEEncoder`` loads."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from rge import RGEEncoder
from rge.cli import main
from rge.errors import RGECheckpointError
from rge.testing import EMB, build_tiny_checkpoint, make_test_image
from rge.training import add_emb_row, add_emb_token, load_training_encoder
from rge.training.config import EVAL_METRICS

from .mmeb_train_fixture import build_mmeb_train_snapshot

CPU = torch.device("cpu")


def _train(model, data, output, *extra: str) -> None:
    options = ["--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "4", "--learning-rate", "1e-3",
               "--device", "cpu", "--no-tensorboard", *extra]  # fmt: skip
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(output), *options]) == 0


def _embeddings(model) -> tuple[torch.Tensor, torch.Tensor]:
    return model.get_input_embeddings().weight, model.get_output_embeddings().weight


def test_rge_train_from_the_base_model_saves_an_rge_checkpoint(tiny_base_path, synthetic_data, tmp_path):
    with pytest.raises(RGECheckpointError, match="<emb>"):
        RGEEncoder.from_pretrained(tiny_base_path, device="cpu")  # the base model is not an RGE checkpoint
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_base_path)
    rows = json.loads((tiny_base_path / "config.json").read_text())["vocab_size"]
    assert EMB not in base_tokenizer.get_vocab() and rows > len(base_tokenizer)  # padded: a spare row

    _train(tiny_base_path, synthetic_data, tmp_path / "out")
    encoder = RGEEncoder.from_pretrained(tmp_path / "out", device="cpu", max_new_tokens=4)
    emb = encoder.checkpoint.emb_token_id
    assert emb == len(base_tokenizer)  # the first spare row, as RGE's 151665
    model = encoder.model
    assert model.get_input_embeddings().num_embeddings == rows  # no resize
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    assert not any(name.startswith("lm_head") for name in load_file(tmp_path / "out" / "model.safetensors"))
    tokenizer = encoder.checkpoint.tokenizer
    assert tokenizer("a<emb>b")["input_ids"].count(emb) == 1 and EMB in tokenizer.all_special_tokens
    assert tokenizer.decode(tokenizer("a<emb>b")["input_ids"], skip_special_tokens=True) == "ab"
    saved = (tmp_path / "out" / "generation_config.json").read_text()
    assert saved == (tiny_base_path / "generation_config.json").read_text()  # RGE carries the base model's
    queries, rationales = encoder.encode_query(["find a b c", "find d e f"], return_rationales=True)
    documents = encoder.encode_document(["A B C", "D E F"])
    assert queries.shape == documents.shape == (2, encoder.embedding_dim) and len(rationales) == 2
    assert np.isfinite(encoder.similarity(queries, documents)).all()


def test_the_emb_row_starts_as_the_mean_of_the_tokens_rows(tiny_base_path):
    encoder, added = load_training_encoder(str(tiny_base_path), device=CPU)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base_path)
    known = len(AutoTokenizer.from_pretrained(tiny_base_path))
    emb = encoder.checkpoint.emb_token_id
    rows, base_rows = encoder.model.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert added and emb == known
    torch.testing.assert_close(rows[emb], base_rows[:known].mean(dim=0))
    assert torch.equal(rows[:emb], base_rows[:emb]) and torch.equal(rows[emb + 1 :], base_rows[emb + 1 :])
    assert encoder.model.lm_head.weight is rows


def test_an_untied_head_gets_its_own_mean_row(tmp_path, synthetic_data):
    path = build_tiny_checkpoint(tmp_path / "untied", with_emb_token=False, tie_word_embeddings=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    before = [matrix.detach().clone() for matrix in _embeddings(model)]
    known = len(tokenizer)
    emb = add_emb_token(tokenizer)
    add_emb_row(model, emb, known_tokens=known)
    for matrix, original in zip(_embeddings(model), before):
        torch.testing.assert_close(matrix[emb], original[:known].mean(dim=0))
    assert not torch.equal(model.lm_head.weight[emb], model.get_input_embeddings().weight[emb])

    _train(path, synthetic_data, tmp_path / "out")  # end to end: the head is saved, and loads
    encoder = RGEEncoder.from_pretrained(tmp_path / "out", device="cpu")
    assert not encoder.model.config.tie_word_embeddings and encoder.checkpoint.emb_token_id == known
    assert encoder.model.lm_head.weight is not encoder.model.get_input_embeddings().weight
    assert "lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")


def test_a_vocabulary_without_a_spare_row_grows_to_a_multiple_of_64(tiny_base_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base_path)
    known = len(tokenizer)
    model.resize_token_embeddings(known)  # no padding: every row is a token's
    tokens_rows = model.get_input_embeddings().weight[:known].detach().clone()
    emb = add_emb_token(tokenizer)
    add_emb_row(model, emb, known_tokens=known)
    rows = model.get_input_embeddings().weight
    assert emb == known and rows.shape[0] == -(-(known + 1) // 64) * 64 == model.config.text_config.vocab_size
    torch.testing.assert_close(rows[emb], tokens_rows.mean(dim=0))
    assert torch.equal(rows[:known], tokens_rows) and model.lm_head.weight is rows


def test_an_rge_checkpoint_is_loaded_as_it_is(tiny_path, synthetic_data, tmp_path):
    encoder, added = load_training_encoder(str(tiny_path), device=CPU)
    reference = RGEEncoder.from_pretrained(tiny_path, device="cpu", dtype="float32")
    assert not added and len(encoder.checkpoint.tokenizer) == len(reference.checkpoint.tokenizer)
    assert encoder.checkpoint.emb_token_id == reference.checkpoint.emb_token_id
    assert list(encoder.checkpoint.tokenizer.get_vocab()).count(EMB) == 1
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[name], tensor), name

    _train(tiny_path, synthetic_data, tmp_path / "out", "--max-steps", "1")
    for file in ("tokenizer.json", "tokenizer_config.json", "vocab.json"):  # copied, not rewritten
        assert (tmp_path / "out" / file).read_bytes() == (tiny_path / file).read_bytes(), file
    trained = RGEEncoder.from_pretrained(tmp_path / "out", device="cpu")
    assert len(trained.checkpoint.tokenizer) == len(reference.checkpoint.tokenizer)
    assert trained.model.get_input_embeddings().num_embeddings == reference.model.get_input_embeddings().num_embeddings


def test_a_base_model_trained_on_an_mmeb_snapshot_and_watched_gives_a_model_rge_loads(
    tiny_base_path, tmp_path, monkeypatch
):
    """The whole route from the base model: ``rge train`` on an MMEB-train snapshot (streamed, rationales
    joined) with held-out MMEB rows evaluated every 2 steps; the saved model encodes, and the log holds the
    evaluations at the eval steps."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    data, images, rationales = build_mmeb_train_snapshot(tmp_path)
    held_out = data / "HatefulMemes" / "original-00000-of-00002.parquet"  # MMEB rows, read as --data reads them
    output = tmp_path / "out"
    _train(tiny_base_path, data, output, "--image-root", str(images), "--rationales", str(rationales),
           "--max-steps", "4", "--eval-data", str(held_out), "--eval-steps", "2")  # fmt: skip

    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log if "loss" in line] == [1, 2, 3, 4]
    evaluations = [line for line in log if "eval/rows" in line]
    assert [line["step"] for line in evaluations] == [2, 4]
    for line in evaluations:
        assert set(EVAL_METRICS) <= line.keys() and line["eval/rows"] == 3
        assert all(np.isfinite(line[name]) for name in EVAL_METRICS)
        assert 0 <= line["eval/recall@1_reasoning"] <= 1 and 0 <= line["eval/recall@1_no_reasoning"] <= 1

    encoder = RGEEncoder.from_pretrained(output, device="cpu", max_new_tokens=4)
    query = encoder.encode_query(["Is this meme hateful?"], images=[make_test_image(40, 36, seed=1)])
    document = encoder.encode_document(["Yes"])
    for vectors in (query, document):
        assert vectors.shape == (1, encoder.embedding_dim) and np.isfinite(vectors).all()
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
