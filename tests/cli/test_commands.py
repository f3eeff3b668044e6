"""The commands' work, counted: ``rge encode`` reads a JSONL input's keys once, though the job is checked both
before the model loads and when it starts."""

from __future__ import annotations

import json

import rge.corpus_rows
from rge.cli import main


def test_encode_reads_the_keys_once(tiny_path, tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": n, "text": f"row {n}"}) + "\n" for n in range(3)))
    passes, real = [], rge.corpus_rows.jsonl_records

    def counted(path):
        passes.append(path)
        return real(path)

    monkeypatch.setattr(rge.corpus_rows, "jsonl_records", counted)
    assert main(["encode", str(corpus), "--output", str(tmp_path / "index"), "--model", str(tiny_path),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert "encoded 3 of 3 rows" in capsys.readouterr().out
    assert len(passes) == 2  # the keys, then the rows
