"""encode_query and encode_document: the parameters ``help()`` shows are ``encode``'s, and what they return at
run time is what their overloads tell a type checker."""

from __future__ import annotations

import inspect
import pydoc

import numpy as np
import pytest
import torch

from rge import Rationales, RGEEncoder


@pytest.mark.parametrize(("method", "reason"), [(RGEEncoder.encode_query, True), (RGEEncoder.encode_document, False)])
def test_the_sides_show_encodes_parameters_and_defaults(method, reason):
    encode = inspect.signature(RGEEncoder.encode).parameters
    side = inspect.signature(method).parameters
    assert list(side) == list(encode)
    for name, parameter in side.items():
        expected = encode[name]
        if name == "reason":
            expected = expected.replace(default=reason)
        if expected.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and name not in ("self", "texts", "images"):
            expected = expected.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        assert parameter == expected, name


@pytest.mark.parametrize("method", [RGEEncoder.encode, RGEEncoder.encode_query, RGEEncoder.encode_document])
def test_help_lists_the_parameters(method):
    shown = pydoc.render_doc(method, renderer=pydoc.plaintext)
    for name in ("texts", "images", "batch_size", "convert_to_tensor", "return_rationales", "prompt_name"):
        assert f"{name}:" in shown  # in the signature
        assert f"``{name}``" in shown or f"``{name}=" in shown  # and in the docstring


def test_what_a_call_returns_is_what_the_overloads_say(encoder):
    vectors, rationales = encoder.encode_query(["a cat", "a dog"], return_rationales=True)
    assert isinstance(vectors, np.ndarray) and isinstance(rationales, Rationales)
    vector, rationale = encoder.encode_query("a cat", return_rationales=True)
    assert isinstance(vector, np.ndarray) and vector.ndim == 1 and type(rationale) is str
    vector, rationale = encoder.encode({"text": "a cat"}, return_rationales=True, convert_to_tensor=True)
    assert isinstance(vector, torch.Tensor) and type(rationale) is str
    assert isinstance(encoder.encode_document(["a cat"], convert_to_tensor=True), torch.Tensor)
    assert isinstance(encoder.encode_document(("a cat", "a dog")), np.ndarray)


def test_similarity_gives_a_tensor_when_either_side_is_one(encoder):
    documents = encoder.encode_document(["a cat", "a dog"])
    assert isinstance(encoder.similarity(documents, documents), np.ndarray)
    assert isinstance(encoder.similarity(torch.from_numpy(documents), documents), torch.Tensor)
    assert isinstance(encoder.similarity(documents, torch.from_numpy(documents)), torch.Tensor)
