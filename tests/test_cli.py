"""``rge demo --tiny`` runs the whole pipeline offline and prints the scores the API computes."""

from __future__ import annotations

import re

import pytest

from rge import RGEEncoder
from rge.cli import DEMO_CANDIDATES, DEMO_QUERY, demo_picture, main
from rge.testing import build_tiny_checkpoint


def test_demo_tiny_prints_the_api_scores(capsys, tmp_path):
    assert main(["demo", "--tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    printed = [float(m) for m in re.findall(r"^(-?\d\.\d{4})  Summarize", out, flags=re.M)]
    assert len(printed) == 2
    assert "rationale:" in out

    encoder = RGEEncoder.from_pretrained(build_tiny_checkpoint(tmp_path), device="cpu")
    query = encoder.encode_query(DEMO_QUERY, images=[demo_picture()])
    expected = encoder.similarity(query, encoder.encode_document(DEMO_CANDIDATES))[0]
    assert printed == pytest.approx([round(float(s), 4) for s in expected], abs=1.5e-4)


def test_demo_needs_a_command(capsys):
    with pytest.raises(SystemExit):
        main([])


@pytest.mark.parametrize("bad", ["0", "-1", "x", "nan"])
def test_bad_repetition_penalty_is_one_line_and_status_2(capsys, tmp_path, bad):
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "o"), "--repetition-penalty", bad])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--repetition-penalty" in error and "Traceback" not in error
    assert not (tmp_path / "o").exists()
