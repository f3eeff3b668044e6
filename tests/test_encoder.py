"""RGEEncoder as users print it (a short repr with what it was loaded from and how it runs, nothing dumped) and as
process pools send it (pickled)."""

from __future__ import annotations

import pickle

import numpy as np

from rge.testing import make_test_image

from .conftest import BUDGET, load_tiny


def test_repr_names_the_model_and_settings_without_dumping_it(encoder, tiny_path):
    expected = (f"RGEEncoder(model={str(tiny_path.resolve())!r}, device={str(encoder.device)!r}, dtype=torch.float32, "
                f"max_new_tokens={BUDGET}, kv_cache='auto')")  # fmt: skip
    assert repr(encoder) == expected
    checkpoint = repr(encoder.checkpoint)
    assert checkpoint.startswith("LoadedCheckpoint(emb_token_id=")
    assert "Qwen2_5" not in checkpoint and "Tokenizer" not in checkpoint and "<|im_start|>" not in checkpoint


def test_an_encoder_pickles_without_its_threads_and_decode_cache(tiny_path):
    """What process pools need (sentence-transformers pickles the model into each worker): a copy made after
    both paths ran (input workers started, a decode cache kept) gives the same vectors."""
    encoder = load_tiny(tiny_path, "cpu", kv_cache="preallocated")
    items = [{"text": "What is in the image?", "image": make_test_image(64, 48, seed=1)}, "cat"]
    queries, documents = encoder.encode_query(items), encoder.encode_document(items)
    copy = pickle.loads(pickle.dumps(encoder))
    np.testing.assert_allclose(copy.encode_query(items), queries, atol=1e-6)
    np.testing.assert_allclose(copy.encode_document(items), documents, atol=1e-6)
