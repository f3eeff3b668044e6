"""``python -m rge.testing tiny PATH`` builds a checkpoint that RGEEncoder loads and encodes with, offline;
``tiny-base PATH`` the base model (no ``<emb>``) that ``rge train`` starts from."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from rge import RGEEncoder
from rge.errors import RGECheckpointError
from rge.testing import EMB
from rge.testing.__main__ import main


def test_the_tiny_command_builds_a_checkpoint_the_encoder_loads(tmp_path, capsys):
    assert main(["tiny", str(tmp_path / "tiny-rge")]) == 0
    assert str(tmp_path / "tiny-rge") in capsys.readouterr().out
    encoder = RGEEncoder.from_pretrained(tmp_path / "tiny-rge", device="cpu", max_new_tokens=8)
    queries, rationales = encoder.encode_query(["What is in the image?"], return_rationales=True)
    documents = encoder.encode_document(["A cat and a dog.", "A cat and a tiger."])
    assert queries.shape == (1, encoder.embedding_dim) and documents.shape == (2, encoder.embedding_dim)
    assert len(rationales) == 1 and np.isfinite(encoder.similarity(queries, documents)).all()


def test_the_tiny_command_refuses_a_file(tmp_path, capsys):
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny", str(tmp_path / "a-file")])
    assert exit_info.value.code == 2 and "is a file" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_the_tiny_base_command_builds_the_base_model_rge_train_starts_from(tmp_path, capsys):
    assert main(["tiny-base", str(tmp_path / "base")]) == 0
    assert "rge train --model" in capsys.readouterr().out
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert EMB not in tokenizer.get_vocab() and config["vocab_size"] > len(tokenizer)  # padded, no <emb>
    assert config["tie_word_embeddings"] and config["transformers_version"] == "4.51.3" and "text_config" not in config
    generation = json.loads((tmp_path / "base" / "generation_config.json").read_text())
    assert generation["top_k"] == 1 and generation["repetition_penalty"] == 1.05
    with pytest.raises(RGECheckpointError, match="<emb>"):
        RGEEncoder.from_pretrained(tmp_path / "base", device="cpu")
