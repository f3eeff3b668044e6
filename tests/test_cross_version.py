"""rge under the transformers it runs on equals the authors' inference under their pinned transformers 4.51.3.

The authors' script (tests/legacy/authors_inference.py) runs in a separate virtual environment that sees
this environment's CPU torch wheel but has transformers 4.51.3 (and the tokenizers and huggingface-hub it
needs) installed over it. It reads the 4.51.3-layout tiny checkpoint, its tokenizer files and its
generation config as it would read MCG-NJU/RGE. A transformers upgrade that changed loading,
processing or decoding would make the token ids or vectors differ here.
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import sys
from pathlib import Path

import pytest
import transformers

from rge import RGEEncoder
from rge.testing import make_test_image

from .conftest import MAX_PIXELS, MIN_PIXELS
from .processes import run_bounded
from .test_candidates import cosine

AUTHORS_TRANSFORMERS = "4.51.3"
SCRIPT = Path(__file__).parent / "legacy" / "authors_inference.py"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
BUDGET = 128  # the authors' max_new_tokens


def _legacy_python() -> Path:
    """The python of a venv with transformers 4.51.3 over the packages of the environment running the tests
    (made once per environment, reused).

    ``--system-site-packages`` would expose the base interpreter's packages, not those of a virtual
    environment the tests run in (where torch is); a ``.pth`` file naming this environment's site-packages
    exposes the right ones, after the venv's own (so its transformers 4.51.3 comes first).
    """
    here = [path for path in site.getsitepackages() if Path(path).is_dir()]
    key = hashlib.sha256(("\n".join([sys.prefix, *here])).encode()).hexdigest()[:12]
    default = Path.home() / ".cache" / "rge" / f"venv-transformers-{AUTHORS_TRANSFORMERS}-{key}"
    venv = Path(os.environ.get("RGE_LEGACY_VENV", default))
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import torch, transformers; print(transformers.__version__)"]
    if python.exists() and run_bounded(probe, timeout=300).stdout.strip() == AUTHORS_TRANSFORMERS:
        return python
    run_bounded([sys.executable, "-m", "venv", "--clear", str(venv)], timeout=300, check=True)
    (legacy_site,) = Path(venv).glob("lib/python*/site-packages")
    (legacy_site / "rge-tests-parent.pth").write_text("\n".join(here) + "\n", encoding="utf-8")
    install = [str(python), "-m", "pip", "install", "--quiet", f"transformers=={AUTHORS_TRANSFORMERS}"]
    run_bounded(install, timeout=900, check=True)
    assert run_bounded(probe, timeout=300, check=True).stdout.strip() == AUTHORS_TRANSFORMERS
    return python


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("cross-version-images")
    images = []
    for seed, size in enumerate([(64, 48), (200, 90), (40, 120)], start=1):
        path = folder / f"{seed}.png"
        make_test_image(*size, seed=seed).save(path)
        images.append(str(path))
    texts = [
        (VISION + " Answer the question based on the given image: What is in the image?\n", images[0]),
        ("cat", None),
        (VISION + "Find the caption of this photo.", images[1]),
        ("How many people are standing in the kitchen, and what are they cooking for dinner tonight?", None),
        (VISION + "Which animal is on the left side of the picture?", images[2]),
        ("Summarize the following answer in one word: A cat and a dog.", None),
    ]
    return [{"text": t, "image": i, "side": side} for side in ("query", "candidate") for t, i in texts]


@pytest.fixture(scope="module")
def authors(tiny_path: Path, items: list[dict], tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("cross-version")
    job = {"checkpoint": str(tiny_path), "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
           "max_new_tokens": BUDGET, "items": items}  # fmt: skip
    (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")
    command = [str(_legacy_python()), str(SCRIPT), str(folder / "job.json"), str(folder / "out.json")]
    run_bounded(command, timeout=900, check=True, cwd=folder)  # (a 128-token budget, one item at a time)
    return json.loads((folder / "out.json").read_text(encoding="utf-8"))


def test_authors_environment_is_really_4_51_3(authors):
    assert authors["transformers"] == AUTHORS_TRANSFORMERS != transformers.__version__
    assert not any(authors["loading_info"].values())  # 4.51.3 loads every weight of the tiny checkpoint


def test_rge_equals_the_authors_code_under_4_51_3(authors, items, tiny_path):
    encoder = RGEEncoder.from_pretrained(
        tiny_path, device="cpu", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_new_tokens=BUDGET
    )
    queries = [item for item in items if item["side"] == "query"]
    texts, images = [q["text"] for q in queries], [q["image"] for q in queries]
    vectors, rationales = encoder.encode_query(texts, images=images, batch_size=4, return_rationales=True)
    documents = encoder.encode_document(texts, images=images, batch_size=4)
    expected = authors["results"]
    lengths = set()
    for row in range(len(queries)):
        assert rationales.token_ids[row] == expected[row]["tokens"], row
        assert cosine(vectors[row], expected[row]["embedding"]) >= 0.9999, row
        assert cosine(documents[row], expected[len(queries) + row]["embedding"]) >= 0.9999, row
        lengths.add(len(expected[row]["tokens"]))
    assert len(lengths) > 1  # rationales of different lengths: early stops and long ones
