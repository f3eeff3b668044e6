"""The MMEB authors' rewrite rules, shared by evaluation and training: applied as the authors apply them,
and shipped as their files byte for byte."""

from __future__ import annotations

import hashlib
from importlib import resources

from rge.mmeb_rules import load_rules, rewrite


def test_rewrite_rules_of_real_entries():
    query, candidate = load_rules("query"), load_rules("candidate")
    assert rewrite("Yes", candidate["HatefulMemes"]) == (
        "Summarize the following statement in one word: Yes, it contains hateful speech.\n"
    )
    assert rewrite("Maybe", candidate["HatefulMemes"]) == "Maybe\n"
    assert rewrite("<|image_1|>\nRepresent the given image for classification\n", query["ImageNet-1K"]) == (
        "<|image_1|>\nIdentify the category of the main object in the given image for classification\n"
    )
    assert (
        rewrite("aeroplane", candidate["VOC2007"]) == "Summarize the following object category in one word: aeroplane\n"
    )
    assert rewrite("<|image_1|>\nCrop the image to to isolate the object labeled as cat", query["MSCOCO"]) == (
        "<|image_1|>\nDescribe and focus on the object in the image labeled as cat\n"
    )
    assert rewrite("text\n", {}) == "text\n"
    assert rewrite("text", {"suffix_add": " end", "prefix_add": "start "}) == "start text end\n"


def test_packaged_rules_are_the_authors_files_byte_for_byte():
    expected = {
        "candidate_replacements.yaml": "2300c7ca619b527918a6fd4f61b4adfe28aec4e12c996027ef518d3d3454757f",
        "instruction_replacements-eval.yaml": "36b915f5eefd6ca2c16b8d70f1e92420517f3775f8e853b97f6e4fae390088b4",
        "instruction_replacements.yaml": "0bfdb4e3edefdfad15908a262d1aba0594f354411629c718c5677a5ad37c0c73",
    }
    for name, digest in expected.items():
        content = resources.files("rge.eval").joinpath(f"data/{name}").read_bytes()
        assert hashlib.sha256(content).hexdigest() == digest, name
