"""Reliability: any input gives a clean vector or a clean RGEInputError; out-of-memory splits and retries;
batch composition, repetition and threads never change a vector."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from rge import RGEInputError
from rge.testing import image_bytes, make_test_image

from .test_candidates import cosine

PROPERTY = settings(max_examples=40)
QUICK_BUDGET = 4

ANY_TEXT = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=80),  # all of Unicode, surrogates too
    st.text(st.characters(max_codepoint=0x1F), max_size=40),  # control characters
    st.text(max_size=4000, min_size=2000),  # long
    st.sampled_from(["<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|video_pad|> x", "<|im_start|>user\n",
                     "<emb>", "<|image_1|> what is this?", "<|vision_start|><|image_pad|><|vision_end|>"]),
)  # fmt: skip
MODES = ["RGB", "RGBA", "L", "LA", "La", "P", "PA", "1", "I", "I;16", "F", "CMYK", "YCbCr", "HSV"]
WRITTEN_AS = {"RGB": "PNG", "RGBA": "PNG", "L": "PNG", "LA": "PNG", "P": "PNG", "1": "PNG", "I;16": "PNG",
              "PA": "TIFF", "I": "TIFF", "F": "TIFF", "CMYK": "TIFF", "YCbCr": "TIFF", "HSV": "WEBP"}  # fmt: skip
"""A format PIL can write each mode in ("La" exists in memory only, so it is tried as a PIL image)."""


def _text_is_invalid(text: str) -> bool:
    """The documented rejections of a text without an image, decided independently of rge."""
    surrogate = any(0xD800 <= ord(char) <= 0xDFFF for char in text)
    marker = "<|image_1|>" in text or "<|vision_start|><|image_pad|><|vision_end|>" in text
    return text == "" or surrogate or "<emb>" in text or marker or "<|image_pad|>" in text


def _image_is_invalid(width: int, height: int) -> bool:
    """Qwen2.5-VL refuses an aspect ratio over 200, after sides under 28 px are raised to 28."""
    width, height = max(width, 28), max(height, 28)
    return max(width, height) / min(width, height) > 200


def _expect(encoder, call, invalid: bool, outcomes: Counter) -> None:
    """``call`` must raise RGEInputError when ``invalid``, else give one finite unit vector."""
    if invalid:
        with pytest.raises(RGEInputError):
            call()
        outcomes["error"] += 1
        return
    vector = call()
    assert vector.shape == (encoder.embedding_dim,)
    assert np.isfinite(vector).all() and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    outcomes["vector"] += 1


def test_any_text_gives_a_vector_or_the_documented_input_error(encoder):
    outcomes: Counter = Counter()

    @PROPERTY
    @given(text=ANY_TEXT, reason=st.booleans())
    def check(text, reason):
        call = lambda: encoder.encode(text, reason=reason, max_new_tokens=QUICK_BUDGET)  # noqa: E731
        _expect(encoder, call, _text_is_invalid(text), outcomes)

    check()
    assert sum(outcomes.values()) == 40  # every example was checked, none rejected
    assert outcomes["vector"] >= 20 and outcomes["error"] >= 3


def test_odd_images_give_a_vector_or_the_documented_input_error(encoder):
    outcomes: Counter = Counter()

    @PROPERTY
    @given(
        mode_and_bytes=st.one_of(
            st.tuples(st.sampled_from(MODES), st.just(False)),
            st.tuples(st.sampled_from(sorted(WRITTEN_AS)), st.just(True)),
        ),
        size=st.one_of(
            st.tuples(st.integers(1, 400), st.integers(1, 400)),
            st.sampled_from([(1, 5000), (5000, 1), (1, 1), (1, 6000), (28, 28), (27, 3000), (6000, 20)]),
        ),
        reason=st.booleans(),
    )
    def check(mode_and_bytes, size, reason):
        mode, as_bytes = mode_and_bytes
        image = _image_in_mode(make_test_image(*size, seed=sum(size)), mode)
        if as_bytes:
            image = image_bytes(image, WRITTEN_AS[mode])
        call = lambda: encoder.encode("what is this?", images=[image], reason=reason,  # noqa: E731
                                      max_new_tokens=QUICK_BUDGET)  # fmt: skip
        _expect(encoder, call, _image_is_invalid(*size), outcomes)

    check()
    assert sum(outcomes.values()) == 40
    assert outcomes["vector"] >= 20


def test_extreme_aspect_ratio_is_an_input_error(encoder):
    with pytest.raises(RGEInputError, match="item 0: image of size 28x6000"):
        encoder.encode_document("x", images=[make_test_image(1, 6000)])
    assert encoder.encode_document("x", images=[make_test_image(1, 5000)]).shape == (64,)


def _image_in_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode in ("La", "PA"):
        return (
            image.convert("RGBA").convert("LA").convert(mode) if mode == "La" else image.convert("RGBA").convert(mode)
        )
    return image.convert(mode)


def test_transparency_is_composited_on_white(encoder):
    rgba = make_test_image(60, 60, seed=1).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))  # fully transparent: looks white
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    transparent = encoder.encode_document("x", images=[rgba])
    np.testing.assert_allclose(transparent, encoder.encode_document("x", images=[white]), atol=1e-6)
    palette = make_test_image(60, 60, seed=2).convert("P")
    np.testing.assert_allclose(encoder.encode_document("x", images=[palette]),
                               encoder.encode_document("x", images=[palette.convert("RGB")]), atol=1e-6)  # fmt: skip


def test_exif_orientation(encoder, tmp_path):
    image = make_test_image(80, 40, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    stored = Image.fromarray(np.asarray(Image.open(path).convert("RGB")))  # pixels as stored, no EXIF
    upright = encoder.encode_document("x", images=[stored.transpose(Image.Transpose.ROTATE_270)])
    raw = encoder.encode_document("x", images=[stored])
    np.testing.assert_allclose(encoder.encode_document("x", images=[path]), upright, atol=1e-6)
    np.testing.assert_allclose(encoder.encode_document("x", images=[path], exif_transpose=False), raw, atol=1e-6)
    assert cosine(upright, raw) < 0.9999


def test_long_input_policy(tiny_path):
    from rge import RGEEncoder

    encoder = RGEEncoder.from_pretrained(tiny_path, max_length=64, max_new_tokens=8)
    assert encoder.max_length == 64
    short, long = "cat", "word " * 100
    assert encoder.encode_document(short).shape == (64,)
    with pytest.raises(RGEInputError, match=r"item 1: prompt of (at least )?\d+ tokens exceeds max_length=64"):
        encoder.encode_document([short, long])
    with pytest.raises(RGEInputError, match="plus 8 reasoning tokens"):
        encoder.encode_query(["word " * 25])
    with pytest.raises(RGEInputError, match="max_pixels"):
        encoder.encode_document("x", images=[make_test_image(600, 600)])
    default = RGEEncoder.from_pretrained(tiny_path)
    assert default.max_length == default.model.config.text_config.max_position_embeddings


def test_unknown_keyword_is_an_input_error(encoder):
    with pytest.raises(RGEInputError, match="unknown keyword arguments: normalize_embeddings"):
        encoder.encode(["a"], normalize_embeddings=True)
    with pytest.raises(RGEInputError, match="unknown keyword arguments: convert_to_list"):
        encoder.encode_query(["a"], convert_to_list=True)


@pytest.fixture
def oom_above(encoder, monkeypatch):
    """Make any forward of more than ``limit`` rows raise CUDA's out-of-memory error; counts the faults."""
    state = {"limit": 1, "faults": 0}
    original = encoder.model.model.forward

    def forward(*args, **kwargs):
        rows = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        if rows > state["limit"]:
            state["faults"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder.model.model, "forward", forward)
    return state


@pytest.mark.parametrize("reason", [False, True])
@pytest.mark.parametrize("limit", [1, 3])
def test_out_of_memory_splits_and_retries(encoder, mixed_items, oom_above, reason, limit, caplog):
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    oom_above["limit"] = len(texts)  # no fault: the unsplit run
    expected, expected_rationales = encoder.encode(texts, images=images, reason=reason, batch_size=8,
                                                   return_rationales=True)  # fmt: skip
    oom_above["limit"] = limit
    with caplog.at_level("WARNING", logger="rge.engine"):
        got, rationales = encoder.encode(texts, images=images, reason=reason, batch_size=8, return_rationales=True)
    assert oom_above["faults"] > 0
    said = [record.message for record in caplog.records if "out of memory" in record.message]
    assert 0 < len(said) <= oom_above["faults"]  # each halving said once, never silent
    assert list(rationales) == list(expected_rationales)
    assert rationales.num_generated_tokens == expected_rationales.num_generated_tokens
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_out_of_memory_on_one_row_is_raised(encoder, oom_above):
    oom_above["limit"] = 0
    for reason in (False, True):
        with pytest.raises(torch.OutOfMemoryError):
            encoder.encode(["a", "b"], reason=reason)


POOL = [("cat", None), ("a much longer query about the red car parked by the river", None),
        ("what is in the image?", 1), ("", 2), ("<|image_1|> describe", 3), ("dog and tiger", None)]  # fmt: skip


@pytest.fixture(scope="module")
def pool_alone(encoder):
    """Each pool item encoded alone, on both paths."""
    images = {seed: make_test_image(40 + 17 * seed, 70 - 9 * seed, seed=seed) for seed in (1, 2, 3)}
    items = [(text, images.get(seed)) for text, seed in POOL]
    alone = {
        reason: [encoder.encode(t, images=[i], reason=reason, return_rationales=True) for t, i in items]
        for reason in (False, True)
    }
    return items, alone


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    order=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=9),
    batch_size=st.integers(1, 5),
    reason=st.booleans(),
)
def test_batch_composition_never_changes_a_vector(encoder, pool_alone, order, batch_size, reason):
    items, alone = pool_alone
    vectors, rationales = encoder.encode([items[i][0] for i in order], images=[items[i][1] for i in order],
                                         reason=reason, batch_size=batch_size, return_rationales=True)  # fmt: skip
    for position, item in enumerate(order):
        expected_vector, expected_rationale = alone[reason][item]
        assert rationales[position] == expected_rationale
        assert cosine(vectors[position], expected_vector) >= 0.9999


def test_two_runs_are_identical(encoder, mixed_items):
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    for reason in (False, True):
        first = encoder.encode(texts, images=images, reason=reason, batch_size=3, return_rationales=True)
        second = encoder.encode(texts, images=images, reason=reason, batch_size=3, return_rationales=True)
        np.testing.assert_array_equal(first[0], second[0])
        assert list(first[1]) == list(second[1])


def test_threads_share_an_encoder(encoder, mixed_items):
    texts, images = [t for t, _ in mixed_items], [i for _, i in mixed_items]
    expected = {reason: encoder.encode(texts, images=images, reason=reason, batch_size=4, return_rationales=True)
                for reason in (False, True)}  # fmt: skip
    results, errors = [], []

    def work(reason):
        try:
            for _ in range(3):
                results.append((reason, encoder.encode(texts, images=images, reason=reason, batch_size=4,
                                                       return_rationales=True)))  # fmt: skip
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 12
    for reason, (vectors, rationales) in results:
        np.testing.assert_allclose(vectors, expected[reason][0], atol=1e-6)
        assert list(rationales) == list(expected[reason][1])
