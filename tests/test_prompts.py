"""Task prompts: taken from the instructions RGE was trained and evaluated with, applied by encode* and every
adapter the same way."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest

from rge import RGEInputError
from rge.prompts import TASK_PROMPTS, VISION_BLOCK
from rge.testing import make_test_image

SHIPPED_RULES = "".join(
    (files("rge.eval") / "data" / name).read_text(encoding="utf-8")
    for name in ("instruction_replacements.yaml", "instruction_replacements-eval.yaml", "candidate_replacements.yaml")
)


@pytest.mark.parametrize("name", sorted(TASK_PROMPTS))
def test_every_prompt_is_an_instruction_of_the_authors(name):
    assert TASK_PROMPTS[name].rstrip(" :.") in SHIPPED_RULES


def test_prompt_and_prompt_name_prefix_each_text(encoder):
    text = "What is on the table?"
    np.testing.assert_array_equal(
        encoder.encode_query(text, prompt_name="vqa"), encoder.encode_query(TASK_PROMPTS["vqa_query"] + text)
    )
    np.testing.assert_array_equal(
        encoder.encode_document("cat", prompt_name="vqa"), encoder.encode_document(TASK_PROMPTS["vqa_document"] + "cat")
    )
    np.testing.assert_array_equal(
        encoder.encode_document("cat", prompt_name="vqa_query"),
        encoder.encode_document(TASK_PROMPTS["vqa_query"] + "cat"),
    )
    np.testing.assert_array_equal(
        encoder.encode_document("cat", prompt="Animal: "), encoder.encode_document("Animal: cat")
    )


def test_prompt_goes_after_the_image(encoder):
    image = make_test_image(64, 48, seed=2)
    prompt = TASK_PROMPTS["vqa_query"]
    np.testing.assert_array_equal(
        encoder.encode_query("What is it?", images=[image], prompt=prompt),
        encoder.encode_query(VISION_BLOCK + prompt + "What is it?", images=[image]),
    )
    alone = encoder.encode_document(images=[image], prompt_name="image_retrieval")
    expected = encoder.encode_document([{"text": TASK_PROMPTS["image_retrieval_document"], "image": image}])
    np.testing.assert_array_equal(alone, expected)


def test_bad_prompts_are_input_errors(encoder):
    with pytest.raises(RGEInputError, match="not both"):
        encoder.encode_query("x", prompt="a", prompt_name="vqa")
    with pytest.raises(RGEInputError, match='unknown prompt_name "nope".*vqa'):
        encoder.encode_query("x", prompt_name="nope")
    with pytest.raises(RGEInputError, match="prompt contains the reserved token <emb>"):
        encoder.encode_query("x", prompt="say <emb>")  # it would be pooled in place of the item's own
    with pytest.raises(RGEInputError, match="prompt is not valid Unicode"):
        encoder.encode_document("x", prompt="\ud800")
    with pytest.raises(RGEInputError, match="empty text and no image"):
        encoder.encode_document("", prompt_name="vqa")  # a prompt does not make an empty item something


def test_adapters_take_the_same_prompts(encoder):
    from mteb.mocks.mock_tasks.retrieval import MockAny2AnyRetrievalT2ITask
    from mteb.types import PromptType

    from rge.integrations.langchain import RGEEmbeddings
    from rge.integrations.llama_index import RGEEmbedding
    from rge.integrations.mteb import RGEMtebModel
    from rge.integrations.sentence_transformers import to_sentence_transformer

    query, document = "What is on the table?", "a cup"
    expected_query = encoder.encode_query(query, prompt_name="vqa")
    expected_document = encoder.encode_document(document, prompt_name="vqa")
    langchain = RGEEmbeddings(encoder=encoder, prompt_name="vqa")
    np.testing.assert_allclose(langchain.embed_query(query), expected_query, atol=1e-6)
    np.testing.assert_allclose(langchain.embed_documents([document])[0], expected_document, atol=1e-6)
    llama = RGEEmbedding(encoder=encoder, query_prompt=TASK_PROMPTS["vqa_query"])
    np.testing.assert_allclose(llama.get_query_embedding(query), expected_query, atol=1e-6)
    np.testing.assert_allclose(llama.get_text_embedding(document), encoder.encode_document(document), atol=1e-6)
    sentence = to_sentence_transformer(encoder)
    got = sentence.encode_query(query, prompt_name="vqa_query", normalize_embeddings=True)
    np.testing.assert_allclose(got, expected_query, atol=1e-6)
    mteb_model = RGEMtebModel(encoder=encoder, prompt_name="vqa")
    batches = [{"text": [query]}]
    got = mteb_model.encode(batches, task_metadata=MockAny2AnyRetrievalT2ITask().metadata, hf_split="test",
                            hf_subset="default", prompt_type=PromptType.query)  # fmt: skip
    np.testing.assert_allclose(got[0], expected_query, atol=1e-6)
    with pytest.raises(ValueError, match="unknown prompt_name"):
        RGEEmbeddings(encoder=encoder, prompt_name="nope")
    with pytest.raises(ValueError, match="not both"):
        RGEEmbeddings(encoder=encoder, prompt_name="vqa", query_prompt="x")
