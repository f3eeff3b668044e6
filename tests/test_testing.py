"""``python -m rge.testing tiny PATH`` builds a checkpoint that RGEEncoder loads and encodes with, offline."""

from __future__ import annotations

import numpy as np
import pytest

from rge import RGEEncoder
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
