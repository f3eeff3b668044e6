"""The candidate path equals an independent single-row reference forward, alone or in any batch."""

from __future__ import annotations

import numpy as np
import torch

from rge.testing import make_test_image


def cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float(a @ b / (a.norm() * b.norm()))


def test_mixed_batch_matches_reference(encoder, reference, mixed_items):
    texts = [text for text, _ in mixed_items]
    images = [image for _, image in mixed_items]
    got = encoder.encode_document(texts, images=images, batch_size=4, normalize=False)
    for row, (text, image) in enumerate(mixed_items):
        assert cosine(got[row], reference.candidate(text, image)) >= 0.9999, row


def test_unnormalized_vector_is_the_raw_hidden_state(encoder, reference):
    got = encoder.encode_document("A cat and a dog.", normalize=False)
    np.testing.assert_allclose(got, reference.candidate("A cat and a dog.").numpy(), rtol=1e-4, atol=1e-4)


def test_same_item_alone_and_in_any_batch(encoder, mixed_items):
    texts = [text for text, _ in mixed_items]
    images = [image for _, image in mixed_items]
    together = encoder.encode_document(texts, images=images, batch_size=len(texts))
    for batch_size in (1, 3):
        split = encoder.encode_document(texts, images=images, batch_size=batch_size)
        assert min(cosine(a, b) for a, b in zip(together, split)) >= 0.9999
    reversed_ = encoder.encode_document(texts[::-1], images=images[::-1], batch_size=4)[::-1]
    assert min(cosine(a, b) for a, b in zip(together, reversed_)) >= 0.9999
    for row in (0, 1, 8):
        alone = encoder.encode_document(texts[row], images=[images[row]])
        assert cosine(alone, together[row]) >= 0.9999


def test_results_come_back_in_input_order(encoder):
    texts = ["short", "a much longer text that makes a longer prompt than the others here", "mid length text"]
    batch = encoder.encode_document(texts, batch_size=1)
    for row, text in enumerate(texts):
        assert cosine(batch[row], encoder.encode_document(text)) >= 0.9999
    assert cosine(batch[0], batch[1]) < 0.9999


def test_image_changes_the_embedding(encoder):
    with_image = encoder.encode_document("a photo", images=[make_test_image(64, 64, seed=7)])
    other_image = encoder.encode_document("a photo", images=[make_test_image(64, 64, seed=8)])
    without = encoder.encode_document("a photo")
    assert cosine(with_image, without) < 0.9999
    assert cosine(with_image, other_image) < 0.9999
