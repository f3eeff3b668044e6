"""Decoding settings: read from generation_config.json, applied as transformers applies them, overridable."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from rge import RGEDecodingWarning, RGEEncoder, RGEInputError
from rge.engine.decoding_settings import GenerationSettings, apply_repetition_penalty, row_token_ids

from .conftest import BUDGET, MAX_PIXELS, MIN_PIXELS
from .reference import Reference
from .test_candidates import cosine


def _with_decoding(tiny_path: Path, target: Path, decoding: dict | None) -> Path:
    """A copy of the tiny checkpoint with other decoding settings (same token ids and weights)."""
    shutil.copytree(tiny_path, target)
    file = target / "generation_config.json"
    if decoding is None:
        file.unlink()
        return target
    ids = {k: v for k, v in json.loads(file.read_text()).items() if k.endswith("token_id")}
    file.write_text(json.dumps({**ids, **decoding}), encoding="utf-8")
    return target


def _load(path: Path) -> RGEEncoder:
    return RGEEncoder.from_pretrained(
        path, device="cpu", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_new_tokens=BUDGET
    )


def test_base_model_settings_are_read_without_warning(tiny_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings = GenerationSettings.from_checkpoint(tiny_path)
    assert settings.repetition_penalty == 1.05 and settings.top_k == 1 and settings.do_sample
    assert not settings.samples_at_random and not settings.top_p_check
    assert settings.source.endswith("generation_config.json")


def test_no_generation_config_means_plain_greedy(tiny_path, tmp_path, mixed_items):
    """Without generation_config.json generate decodes with transformers' defaults, the plain arg-max: so
    does an encoder loaded from that checkpoint (no penalty, no sampling, nothing to warn about)."""
    path = _with_decoding(tiny_path, tmp_path / "none", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder = _load(path)
    settings = encoder.generation_settings
    assert (settings.repetition_penalty, settings.do_sample, settings.top_k, settings.top_p) == (1.0, False, None, None)
    assert not settings.samples_at_random and not settings.top_p_check and settings.source == "defaults"
    reference = Reference.load(path, MIN_PIXELS, MAX_PIXELS)
    texts, images = [t for t, _ in mixed_items[:4]], [i for _, i in mixed_items[:4]]
    vectors, rationales = encoder.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    for row, (text, image) in enumerate(mixed_items[:4]):
        expected, tokens = reference.query(text, image, max_new_tokens=BUDGET)
        assert rationales.token_ids[row] == tokens, row
        assert cosine(vectors[row], expected) >= 0.9999, row


def test_penalty_equals_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 40, generator=generator) * 3
    input_ids = torch.randint(0, 40, (5, 17), generator=generator)  # duplicates included
    expected = RepetitionPenaltyLogitsProcessor(1.05)(input_ids, scores.clone())
    got = apply_repetition_penalty(scores.clone(), input_ids, 1.05)
    assert torch.equal(got, expected)


def test_row_ids_ignore_padding_but_not_a_real_pad_id():
    pad = 0
    input_ids = torch.tensor([[pad, pad, 5, 6], [pad, 7, 5, pad]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    ids = row_token_ids(input_ids, mask)
    assert set(ids[0].tolist()) == {5, 6}
    assert set(ids[1].tolist()) == {0, 5, 7}
    scores = torch.randn(2, 10)
    penalized = apply_repetition_penalty(scores.clone(), ids, 2.0)
    assert torch.equal(penalized[0, [0, 1, 7]], scores[0, [0, 1, 7]])  # the pad id is not in row 0
    assert not torch.equal(penalized[0, [5, 6]], scores[0, [5, 6]])


def test_random_sampling_warns_and_decodes_greedily(tiny_path, tmp_path, mixed_items):
    path = _with_decoding(tiny_path, tmp_path / "sampling", {"do_sample": True, "top_k": 50, "temperature": 0.7})
    with pytest.warns(RGEDecodingWarning, match="samples at random"):
        encoder = _load(path)
    assert encoder.generation_settings.samples_at_random
    reference = Reference.load(path, MIN_PIXELS, MAX_PIXELS)
    for text, image in mixed_items[:3]:
        expected, tokens = reference.query(text, image, max_new_tokens=BUDGET, do_sample=False)
        vectors, rationales = encoder.encode_query([text], images=[image], return_rationales=True)
        assert rationales.token_ids[0] == tokens
        assert cosine(vectors[0], expected) >= 0.9999


def test_tiny_top_p_keeps_the_best_token_and_matches_sampling_generate(tiny_path, tmp_path, mixed_items):
    """do_sample with top_p alone (top_k off): generate draws among one token, so rge equals it exactly."""
    decoding = {"do_sample": True, "top_k": 0, "top_p": 0.001, "temperature": 0.1, "repetition_penalty": 1.05}
    path = _with_decoding(tiny_path, tmp_path / "top_p", decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder = _load(path)
        texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
        vectors, rationales = encoder.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    assert encoder.generation_settings.top_p_check
    reference = Reference.load(path, MIN_PIXELS, MAX_PIXELS)
    for row, (text, image) in enumerate(mixed_items):
        torch.manual_seed(row)  # generate really samples here; the draw must not matter
        expected, tokens = reference.query(text, image, max_new_tokens=BUDGET)
        assert rationales.token_ids[row] == tokens
        assert cosine(vectors[row], expected) >= 0.9999


def test_wide_top_p_warns_when_generate_would_sample(tiny_path, tmp_path):
    decoding = {"do_sample": True, "top_k": 0, "top_p": 0.999, "temperature": 1.0}
    encoder = _load(_with_decoding(tiny_path, tmp_path / "wide", decoding))
    with pytest.warns(RGEDecodingWarning, match="would sample among several tokens"):
        encoder.encode_query(["What is in the image?", "cat"])


def test_settings_rge_does_not_apply_are_named(tiny_path, tmp_path):
    path = _with_decoding(tiny_path, tmp_path / "beams", {"num_beams": 4, "repetition_penalty": 1.05})
    with pytest.warns(RGEDecodingWarning, match="num_beams"):
        settings = GenerationSettings.from_checkpoint(path)
    assert settings.repetition_penalty == 1.05


@pytest.mark.parametrize("bad", [0, -1.0, "1.05", True, float("nan")])
def test_bad_penalty_is_refused(encoder, tiny_path, bad):
    with pytest.raises(RGEInputError, match="repetition_penalty"):
        encoder.encode_query("cat", repetition_penalty=bad)
    with pytest.raises(RGEInputError, match="repetition_penalty"):
        RGEEncoder(encoder.checkpoint, repetition_penalty=bad)


def test_penalty_keeps_batch_invariance_under_admission_and_compaction(encoder, mixed_items):
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    alone = [
        encoder.encode_query([t], images=[i], return_rationales=True)[1].token_ids[0] for t, i in zip(texts, images)
    ]
    tokenized = encoder.prepare(texts, images, reason=True)
    for batch_size in (2, 3):
        assert encoder.query_decoder(batch_size, BUDGET, admission=True).run(tokenized).generated == alone
