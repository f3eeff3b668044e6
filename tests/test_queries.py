"""The query path equals the reference (batch-1 generate + extra forward): same rationales, same vectors."""

from __future__ import annotations

import pytest

from rge import RGEEncoder

from .conftest import BUDGET
from .test_candidates import cosine


@pytest.fixture(scope="module")
def reference_queries(reference, mixed_items):
    return [reference.query(text, image, max_new_tokens=BUDGET) for text, image in mixed_items]


def test_fixture_stops_at_different_steps(reference_queries, encoder):
    """The tiny model must exercise early stops and budget hits, or the tests below prove little."""
    emb = encoder.checkpoint.emb_token_id
    lengths = [len(tokens) for _, tokens in reference_queries]
    stopped = [tokens[-1] == emb for _, tokens in reference_queries]
    assert any(stopped) and not all(stopped)
    assert min(length for length, hit in zip(lengths, stopped) if hit) <= 6
    assert any(length == BUDGET and not hit for length, hit in zip(lengths, stopped))


@pytest.mark.parametrize("batch_size", [1, 3, 4, 10])
@pytest.mark.parametrize("admission", [True, False])
def test_matches_reference(encoder: RGEEncoder, reference_queries, mixed_items, batch_size, admission):
    tokenized, _ = encoder._prepare([text for text, _ in mixed_items], [image for _, image in mixed_items], reason=True)
    embeddings, rationales = encoder._encode_reasoning(tokenized, batch_size, BUDGET, False, admission=admission)
    for row, (expected, tokens) in enumerate(reference_queries):
        assert rationales.num_generated_tokens[row] == len(tokens), row
        assert rationales[row] == encoder._rationale_text(tokens), row
        assert cosine(embeddings[row], expected) >= 0.9999, row


def test_public_api_matches_reference(encoder, reference_queries, mixed_items, reference):
    texts = [text for text, _ in mixed_items]
    images = [image for _, image in mixed_items]
    embeddings, rationales = encoder.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    for row, (expected, tokens) in enumerate(reference_queries):
        text = reference.tokenizer.decode(tokens, skip_special_tokens=False).replace("<emb>", "")
        assert rationales[row] == text
        assert "<emb>" not in rationales[row]
        assert cosine(embeddings[row], expected) >= 0.9999


def test_same_query_whatever_its_neighbours(encoder, mixed_items):
    texts = [text for text, _ in mixed_items]
    images = [image for _, image in mixed_items]
    alone = [encoder.encode_query(t, images=[i], return_rationales=True) for t, i in zip(texts, images)]
    for batch_size in (2, 7):
        order = list(range(len(texts)))[::-1]
        vectors, rationales = encoder.encode_query(
            [texts[i] for i in order], images=[images[i] for i in order], batch_size=batch_size, return_rationales=True
        )
        for position, row in enumerate(order):
            assert rationales[position] == alone[row][1]
            assert cosine(vectors[position], alone[row][0]) >= 0.9999


def test_max_new_tokens_is_honoured(encoder, reference, mixed_items):
    texts = [text for text, _ in mixed_items]
    images = [image for _, image in mixed_items]
    for budget in (1, 5):
        vectors, rationales = encoder.encode_query(texts, images=images, max_new_tokens=budget, return_rationales=True)
        assert max(rationales.num_generated_tokens) <= budget
        assert budget in rationales.num_generated_tokens
        expected, tokens = reference.query(texts[5], images[5], max_new_tokens=budget)
        assert rationales.num_generated_tokens[5] == len(tokens)
        assert cosine(vectors[5], expected) >= 0.9999


def test_query_and_candidate_encodings_differ(encoder):
    query = encoder.encode_query("What is in the image?")
    document = encoder.encode_document("What is in the image?")
    assert cosine(query, document) < 0.999


def test_documents_can_reason_too(encoder):
    assert cosine(encoder.encode_document("cat", reason=True), encoder.encode_query("cat")) >= 0.9999
