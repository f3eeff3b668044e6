"""Input conventions and bad input: RGEInputError names the item, before any model work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rge import RGEInputError
from rge.testing import image_bytes, make_test_image

from .test_candidates import cosine


@pytest.fixture
def no_model_calls(encoder, monkeypatch):
    """Fail the test if the model is run."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran before the input was validated")

    monkeypatch.setattr(encoder.model.model, "forward", forbidden)
    return encoder


def _bad_cases(tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    good = make_test_image(40, 40)
    return [
        (dict(texts=["ok", "x"], images=[good, tmp_path / "missing.png"]), 1, "not found"),
        (dict(texts=["x"], images=[str(broken)]), 0, "cannot be decoded"),
        (dict(texts=["ok", "x"], images=[None, b"\x89PNG\r\n garbage"]), 1, "cannot be decoded"),
        (dict(texts=["x"], images=[12345]), 0, "unsupported image type"),
        (dict(texts=["a", 3]), 1, "must be a str"),
        (dict(texts=["a", None]), 1, "text is None"),
        (dict(texts=["a", "b"], images=[good]), None, "2 texts but 1 images"),
        (dict(texts=["<|image_1|> and <|image_1|>"], images=[good]), 0, "2 image markers"),
        (dict(texts=["ok", "<|image_1|> what is this?"]), 1, "marker but no image"),
        (dict(texts=["ok", "<|vision_start|><|image_pad|><|vision_end|>x"], images=[None, None]), 1, "marker"),
        (dict(texts=["a <emb> b"]), 0, "reserved token"),
        (dict(texts=["ok", "a <|image_pad|> b"]), 1, "outside a vision block"),
        (dict(texts=["ok", "half a pair \ud800"]), 1, "not valid Unicode"),
        (dict(texts=["x"], images=[Image_mode("La")]), 0, "cannot be converted to RGB"),
        (dict(texts=[{"text": "a", "img": good}]), 0, "unknown keys"),
        (dict(texts=[{"text": "a", "image": good}], images=[good]), 0, "both"),
        (dict(texts=["a"], images=[Image_zero()]), 0, "zero size"),
        (dict(texts=42), None, "texts must be"),
    ]


def Image_mode(mode):
    from PIL import Image

    return Image.new(mode, (40, 40))


def Image_zero():
    from PIL import Image

    return Image.new("RGB", (0, 0))


@pytest.mark.parametrize("reason", [False, True])
def test_bad_input_raises_before_model_work(no_model_calls, tmp_path, reason):
    for kwargs, index, message in _bad_cases(tmp_path):
        with pytest.raises(RGEInputError, match=message) as raised:
            no_model_calls.encode(reason=reason, **kwargs)
        assert isinstance(raised.value, ValueError)
        assert raised.value.index == index, kwargs
        if index is not None:
            assert str(raised.value).startswith(f"item {index}:")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reason="yes"), "reason must be a bool"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(batch_size=2.5), "batch_size"),
    ],
)
def test_bad_options(no_model_calls, kwargs, message):
    with pytest.raises(RGEInputError, match=message):
        no_model_calls.encode(["a"], **kwargs)


def test_encoder_is_usable_after_bad_input(encoder, tmp_path):
    before = encoder.encode_document(["cat", "dog"])
    for kwargs, _, _ in _bad_cases(tmp_path):
        with pytest.raises(RGEInputError):
            encoder.encode(reason=False, **kwargs)
    np.testing.assert_array_equal(encoder.encode_document(["cat", "dog"]), before)


def test_empty_input(encoder):
    for reason in (False, True):
        empty = encoder.encode([], reason=reason)
        assert empty.shape == (0, 64) and empty.dtype == np.float32
        vectors, rationales = encoder.encode([], reason=reason, return_rationales=True)
        assert vectors.shape == (0, 64) and list(rationales) == []


def test_output_conventions(encoder):
    single = encoder.encode_document("cat")
    assert single.shape == (64,) and single.dtype == np.float32
    batch = encoder.encode_document(["cat", "dog"])
    assert batch.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-6)
    raw = encoder.encode_document(["cat", "dog"], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), batch, atol=1e-6)
    tensor = encoder.encode_document(["cat"], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.shape == (1, 64)
    assert isinstance(encoder.encode_document(["cat"], convert_to_numpy=False), torch.Tensor)
    vectors, rationales = encoder.encode_document(["cat", "dog"], return_rationales=True)
    assert list(rationales) == ["", ""] and rationales.num_generated_tokens == [0, 0]
    vector, rationale = encoder.encode_query("cat", return_rationales=True)
    assert vector.shape == (64,) and isinstance(rationale, str)


def test_image_forms_give_the_same_vector(encoder, tmp_path):
    image = make_test_image(90, 60, seed=3)
    path = tmp_path / "photo.png"
    image.save(path)
    forms = [image, path, str(path), image_bytes(image)]
    vectors = encoder.encode_document(["a photo"] * len(forms), images=forms)
    for vector in vectors[1:]:
        np.testing.assert_allclose(vector, vectors[0], atol=1e-6)


def test_dict_items_equal_texts_with_images(encoder):
    image = make_test_image(60, 60, seed=4)
    as_lists = encoder.encode_document(["a photo", "text only"], images=[image, None])
    as_dicts = encoder.encode_document([{"text": "a photo", "image": image}, {"text": "text only"}])
    np.testing.assert_allclose(as_dicts, as_lists, atol=1e-6)
    image_only = encoder.encode_document([{"image": image}])
    assert image_only.shape == (1, 64)
    single_dict = encoder.encode_document({"text": "a photo", "image": image})
    np.testing.assert_allclose(single_dict, as_lists[0], atol=1e-6)


def test_image_placement(encoder):
    image = make_test_image(60, 60, seed=5)
    default = encoder.encode_document("describe", images=[image])
    explicit = encoder.encode_document("<|vision_start|><|image_pad|><|vision_end|>describe", images=[image])
    marker = encoder.encode_document("<|image_1|>describe", images=[image])
    after = encoder.encode_document("describe <|image_1|>", images=[image])
    np.testing.assert_allclose(explicit, default, atol=1e-6)
    np.testing.assert_allclose(marker, default, atol=1e-6)
    assert cosine(after, default) < 0.9999


def test_similarity(encoder):
    a = encoder.encode_document(["cat", "dog", "tiger"], normalize=False)
    b = encoder.encode_document(["a cat", "a dog"], normalize=False)
    scores = encoder.similarity(a, b)
    assert isinstance(scores, np.ndarray) and scores.shape == (3, 2) and scores.dtype == np.float32
    for i in range(3):
        for j in range(2):
            assert scores[i, j] == pytest.approx(cosine(a[i], b[j]), abs=1e-5)
    as_tensor = encoder.similarity(torch.from_numpy(a), b)
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor.numpy(), scores, atol=1e-6)
    assert encoder.similarity(a[0], b).shape == (1, 2)
