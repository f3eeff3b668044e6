"""LanceDB's "rge" function: inserts embed documents (texts, image bytes, image URIs), searches reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lancedb
import numpy as np
import pytest
from lancedb.embeddings import get_registry
from lancedb.pydantic import LanceModel, Vector
from PIL import Image

from rge.errors import RGEInputError
from rge.integrations.lancedb import RGEEmbeddingFunction

from .vectors import assert_same_vectors

QUERY = "What is in the image?"
TEXTS = ["A cat and a dog.", "A cat and a tiger.", "A red car."]


def test_text_table_round_trip_and_reopen_in_a_new_process(encoder, tmp_path):
    rge_fn = get_registry().get("rge").create(encoder=encoder, batch_size=2)
    assert isinstance(rge_fn, RGEEmbeddingFunction) and rge_fn.encoder is encoder
    assert rge_fn.ndims() == encoder.embedding_dim

    class Document(LanceModel):
        text: str = rge_fn.SourceField()
        vector: Vector(rge_fn.ndims()) = rge_fn.VectorField()  # type: ignore[valid-type]

    table = lancedb.connect(tmp_path / "db").create_table("docs", schema=Document)
    table.add([{"text": text} for text in TEXTS])
    hits = table.search(QUERY).limit(3).to_pydantic(Document)
    documents, query = encoder.encode_document(TEXTS), encoder.encode_query(QUERY)
    assert [hit.text for hit in hits] == [TEXTS[i] for i in np.argsort(-(documents @ query))]
    assert_same_vectors([hit.vector for hit in hits], encoder.encode_document([hit.text for hit in hits]))
    assert_same_vectors(rge_fn.compute_query_embeddings(QUERY), [query])
    here = table.search(QUERY).limit(3).to_list()

    code = f"""if True:
        import json, lancedb, rge.integrations.lancedb
        found = lancedb.connect({str(tmp_path / "db")!r}).open_table("docs").search({QUERY!r}).limit(3).to_list()
        print(json.dumps([[hit["text"] for hit in found], [hit["_distance"] for hit in found]]))
    """
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    texts, distances = json.loads(done.stdout.strip().splitlines()[-1])
    assert texts == [hit["text"] for hit in here]
    np.testing.assert_allclose(distances, [hit["_distance"] for hit in here], atol=1e-4)


def test_image_tables_from_bytes_and_from_uris(encoder, image_paths, tmp_path):
    database = lancedb.connect(tmp_path / "db")
    by_bytes = get_registry().get("rge").create(encoder=encoder)
    by_uri = get_registry().get("rge").create(encoder=encoder, image_uris=True, query_prompt="Find the picture.")

    class Picture(LanceModel):
        image: bytes = by_bytes.SourceField()
        vector: Vector(by_bytes.ndims()) = by_bytes.VectorField()  # type: ignore[valid-type]

    class PictureFile(LanceModel):
        uri: str = by_uri.SourceField()
        vector: Vector(by_uri.ndims()) = by_uri.VectorField()  # type: ignore[valid-type]

    pictures = database.create_table("pictures", schema=Picture)
    pictures.add([{"image": Path(path).read_bytes()} for path in image_paths])
    files = database.create_table("files", schema=PictureFile)
    files.add([{"uri": path} for path in image_paths])
    expected = encoder.encode_document([{"image": path} for path in image_paths])
    assert_same_vectors(pictures.to_pandas()["vector"].tolist(), expected)
    assert_same_vectors(files.to_pandas()["vector"].tolist(), expected)

    image = Image.open(image_paths[0])
    assert_same_vectors(by_bytes.compute_query_embeddings(image), encoder.encode_query([{"image": image}]))
    both = {"text": QUERY, "image": image_paths[1]}
    assert_same_vectors(by_bytes.compute_query_embeddings(both), encoder.encode_query([both]))
    hit = files.search(QUERY).limit(1).to_list()[0]
    scores = expected @ encoder.encode_query(QUERY, prompt="Find the picture.")
    assert hit["uri"] == image_paths[int(np.argmax(scores))]
    np.testing.assert_allclose(hit["_distance"], 2 - 2 * scores.max(), atol=1e-4)  # squared L2 of unit vectors


def test_null_values_get_no_vector_and_errors_are_neither_retried_nor_wrapped(encoder, tmp_path):
    rge_fn = get_registry().get("rge").create(encoder=encoder)
    vectors = rge_fn.compute_source_embeddings(["A cat.", None])
    assert vectors[1] is None
    assert_same_vectors(vectors[0], encoder.encode_document("A cat."))

    class Document(LanceModel):
        text: str = rge_fn.SourceField()
        vector: Vector(rge_fn.ndims()) = rge_fn.VectorField()  # type: ignore[valid-type]

    table = lancedb.connect(tmp_path / "db").create_table("docs", schema=Document)
    with pytest.raises(RuntimeError, match="item 0: empty text and no image"):  # Arrow's wrapping, our message
        table.add([{"text": ""}])
    with pytest.raises(RGEInputError, match="nothing to embed"):
        table.search("").limit(1).to_list()
    with pytest.raises(ValueError, match="only apply with model_name"):
        get_registry().get("rge").create(encoder=encoder, device="cpu")
    with pytest.raises(ValueError, match="Sensitive key 'token'"):
        get_registry().get("rge").create(model_name="MCG-NJU/RGE", token="hf_secret")
