"""The query path equals the authors' algorithm (batch-1 generate with the checkpoint's generation config, then
their extra forward): the same generated token ids, the same final-norm vectors."""

from __future__ import annotations

import pytest
import torch

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
    tokenized = encoder.prepare([text for text, _ in mixed_items], [image for _, image in mixed_items], reason=True)
    result = encoder.query_decoder(batch_size, BUDGET, admission=admission).run(tokenized)
    for row, (expected, tokens) in enumerate(reference_queries):
        assert result.generated[row] == tokens, row
        assert cosine(result.embeddings[row], expected) >= 0.9999, row


def test_public_api_matches_reference(encoder, reference_queries, mixed_items, reference):
    texts = [text for text, _ in mixed_items]
    images = [image for _, image in mixed_items]
    embeddings, rationales = encoder.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    for row, (expected, tokens) in enumerate(reference_queries):
        text = reference.tokenizer.decode(tokens, skip_special_tokens=False).replace("<emb>", "")
        assert rationales.token_ids[row] == tokens
        assert rationales[row] == text
        assert "<emb>" not in rationales[row]
        assert cosine(embeddings[row], expected) >= 0.9999


# Two copies of the longest prompt stop together (step 8) while two shorter ones decode on: a batch of four
# loses its first two rows in one step, and the two rows still decoding move into their places.
FINISH_TOGETHER = ["Summarize: a red car parked by a tree near the river."] * 2 + [
    "this photo which animal is on the left red car",
    "the image find the caption of this photo which animal",
]


@pytest.mark.parametrize("kv_cache", ["dynamic", "preallocated", "static"])
def test_rows_finishing_in_one_step_leave_the_others_whole(encoder, reference, kv_cache):
    """Each row still decoding keeps its own keys, values and state when the rows that finished leave: the
    authors' tokens and vectors for every query, whatever the cache kind."""
    expected = [reference.query(text, max_new_tokens=BUDGET) for text in FINISH_TOGETHER]
    lengths = [len(tokens) for _, tokens in expected]
    prompts = [len(item) for item in encoder.prepare(FINISH_TOGETHER, reason=True)]
    assert lengths[0] == lengths[1] < min(lengths[2:])  # the first two finish in one step, before the others
    assert min(prompts[:2]) > max(prompts[2:]) and prompts[2] != prompts[3]  # they lead the batch (longest first)
    cached = RGEEncoder(encoder.checkpoint, max_new_tokens=BUDGET, kv_cache=kv_cache)
    vectors, rationales = cached.encode_query(FINISH_TOGETHER, batch_size=4, return_rationales=True)
    for row, (vector, tokens) in enumerate(expected):
        assert rationales.token_ids[row] == tokens, row
        assert cosine(vectors[row], vector) >= 0.9999, row


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


def test_embedding_is_the_final_norm_state_not_the_pre_norm_one(encoder, reference, mixed_items):
    """The checkpoint's final RMSNorm has uneven weights, so the two states point different ways."""
    captured = []
    norm = reference.model.model.language_model.norm
    handle = norm.register_forward_hook(lambda module, args, out: captured.append(args[0][0, -1].clone()))
    try:
        for text, image in mixed_items[:4]:
            post_norm, _ = reference.query(text, image, max_new_tokens=BUDGET)
            pre_norm = captured[-1]  # the extra forward's input to the final norm
            vector = encoder.encode_query(text, images=[image])
            assert cosine(vector, post_norm) >= 0.9999
            assert cosine(vector, pre_norm) < 0.99
    finally:
        handle.remove()


def test_the_repetition_penalty_decides_tokens_on_this_checkpoint(encoder, reference_queries, mixed_items):
    """Plain arg-max decoding would give other rationales for most queries: the penalty is exercised."""
    texts = [text for text, _ in mixed_items]
    images = [image for _, image in mixed_items]
    _, plain = encoder.encode_query(texts, images=images, return_rationales=True, repetition_penalty=1.0)
    differing = sum(ids != tokens for ids, (_, tokens) in zip(plain.token_ids, reference_queries))
    assert differing >= len(texts) // 2


def test_penalty_override_per_call_and_per_encoder_matches_generate(encoder, reference, mixed_items, tiny_path,
                                                                    device):  # fmt: skip
    from .conftest import load_tiny

    plain_encoder = load_tiny(tiny_path, device, repetition_penalty=1.0)
    assert plain_encoder.generation_settings.repetition_penalty == 1.0
    assert encoder.generation_settings.repetition_penalty == 1.05
    for text, image in mixed_items[:5]:
        expected, tokens = reference.query(text, image, max_new_tokens=BUDGET, repetition_penalty=1.0)
        for got, rationale in (
            encoder.encode_query(text, images=[image], return_rationales=True, repetition_penalty=1.0),
            plain_encoder.encode_query(text, images=[image], return_rationales=True),
        ):
            assert encoder.rationale_texts([tokens]) == [rationale]
            assert cosine(got, expected) >= 0.9999
        heavy, heavy_tokens = reference.query(text, image, max_new_tokens=BUDGET, repetition_penalty=1.3)
        decoder = encoder.query_decoder(1, BUDGET, generation=encoder.generation_settings.with_penalty(1.3))
        got = decoder.run(encoder.prepare(text, [image], reason=True))
        assert got.generated[0] == heavy_tokens
        assert torch.nn.functional.cosine_similarity(got.embeddings[0], heavy, dim=0) >= 0.9999
