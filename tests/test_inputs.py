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


@pytest.fixture
def image_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving a PNG at /cat.png, a 404 elsewhere, a slow /slow.png, /moved
    (a redirect to /cat.png) and /loop (a redirect to itself)."""
    import http.server
    import threading
    import time

    png = image_bytes(make_test_image(64, 48, seed=7))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path in ("/moved", "/loop"):
                self.send_response(302)
                self.send_header("Location", "/cat.png" if self.path == "/moved" else "/loop")
                self.end_headers()
                return
            if self.path == "/slow.png":
                time.sleep(1.0)
            if self.path in ("/cat.png", "/slow.png"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                try:
                    self.wfile.write(png)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the size and timeout tests)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", png
    server.shutdown()
    server.server_close()


def test_http_images_are_fetched(encoder, image_server, monkeypatch):
    base, png = image_server
    from_url = encoder.encode_document(["a photo"], images=[f"{base}/cat.png"])
    from_bytes = encoder.encode_document(["a photo"], images=[png])
    np.testing.assert_array_equal(from_url, from_bytes)
    np.testing.assert_array_equal(encoder.encode_document(["a photo"], images=[f"{base}/moved"]), from_bytes)
    with pytest.raises(RGEInputError, match=r"item 0: image URL .*/loop' redirected more than 10 times"):
        encoder.encode_document(["a"], images=[f"{base}/loop"])
    with pytest.raises(RGEInputError, match=r"item 1: image URL .*/missing.png' answered HTTP 404"):
        encoder.encode_document(["a", "b"], images=[None, f"{base}/missing.png"])
    monkeypatch.setattr("rge.images.URL_MAX_BYTES", 100)
    with pytest.raises(RGEInputError, match="item 0: image URL .* body is [0-9]+ bytes; rge fetches at most 100"):
        encoder.encode_document(["a"], images=[f"{base}/cat.png"])
    monkeypatch.setattr("rge.images.URL_TIMEOUT_SECONDS", 0.2)
    with pytest.raises(RGEInputError, match="item 0: image URL .* took longer than 0.2 s to fetch"):
        encoder.encode_document(["a"], images=[f"{base}/slow.png"])


def test_image_urls_go_through_the_proxy_the_environment_names(encoder, monkeypatch):
    """``HTTP_PROXY`` (as urllib reads it) carries the encoder's fetch: a host only the proxy can reach works."""
    import http.server
    import threading

    png = image_bytes(make_test_image(64, 48, seed=7))
    asked: list[str] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            asked.append(self.path)  # a proxy is sent the absolute URL
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name in ("http_proxy", "no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
        through_proxy = encoder.encode_document(["a photo"], images=["http://images.invalid/cat.png"])
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["http://images.invalid/cat.png"]
    np.testing.assert_array_equal(through_proxy, encoder.encode_document(["a photo"], images=[png]))


def test_arrays_and_tensors_are_images(encoder):
    picture = make_test_image(64, 48, seed=3)
    hwc = np.array(picture)  # a writable copy, as torch.from_numpy wants
    expected = encoder.encode_document("x", images=[picture])
    for pixels in (hwc, np.moveaxis(hwc, -1, 0), torch.from_numpy(hwc), torch.from_numpy(hwc).permute(2, 0, 1),
                   hwc.astype(np.float32) / 255, torch.from_numpy(hwc).permute(2, 0, 1).float() / 255):  # fmt: skip
        np.testing.assert_array_equal(encoder.encode_document("x", images=[pixels]), expected)
    gray = make_test_image(64, 48, seed=3, mode="L")
    np.testing.assert_array_equal(
        encoder.encode_document("x", images=[np.asarray(gray)]), encoder.encode_document("x", images=[gray])
    )
    for bad, message in ((hwc.astype(np.float32), r"\[0, 1\]"), (hwc[..., :2], "channels"),
                         (hwc.astype(np.int16), "uint8 or float"), (np.zeros((2, 3, 4, 5)), "channels")):  # fmt: skip
        with pytest.raises(RGEInputError, match=f"item 0: .*{message}"):
            encoder.encode_document("x", images=[bad])


def test_images_alone(encoder):
    first, second = make_test_image(64, 48, seed=1), make_test_image(90, 60, seed=2)
    alone = encoder.encode_document(images=[first, second])
    as_items = encoder.encode_document([{"image": first}, {"image": second}])
    np.testing.assert_array_equal(alone, as_items)
    single = encoder.encode_document(images=first)
    assert single.shape == (encoder.embedding_dim,)
    np.testing.assert_allclose(single, alone[0], atol=1e-6)  # alone vs in a padded batch of two
    with pytest.raises(RGEInputError, match="give texts, images or both"):
        encoder.encode_document()


def test_any_container_of_texts(encoder):
    import pandas as pd

    texts = ["cat", "a dog on a beach", "What is in the image?"]
    expected = encoder.encode_document(texts)
    for container in (tuple(texts), np.array(texts), pd.Series(texts), (t for t in texts), iter(texts)):
        np.testing.assert_array_equal(encoder.encode_document(container), expected)
    with pytest.raises(RGEInputError, match="texts must be"):
        encoder.encode_document(b"bytes are not text")


@pytest.mark.parametrize("texts", [[""], [{}], ["ok", ""], ["ok", {"text": ""}]])
def test_empty_text_without_image_is_an_error(no_model_calls, texts):
    with pytest.raises(RGEInputError, match=rf"item {len(texts) - 1}: empty text and no image"):
        no_model_calls.encode_document(texts)


def test_similarity_checks_the_dimension(encoder):
    vectors = encoder.encode_document(["a", "b"])
    assert encoder.similarity(vectors, vectors[0]).shape == (2, 1)
    for wrong in (np.ones((4, 32)), np.ones(32), np.ones((2, 2, 64))):
        with pytest.raises(RGEInputError, match=f"expected \\({encoder.embedding_dim},\\)"):
            encoder.similarity(vectors, wrong)


def test_a_decompression_bomb_is_an_input_error(encoder, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x48 is over twice this: PIL's bomb error
    with pytest.raises(RGEInputError, match="item 0: image bytes cannot be decoded"):
        encoder.encode_document("x", images=[image_bytes(make_test_image(64, 48, seed=1))])
