"""Chroma: documents (texts and images) on the candidate path, queries reasoning, in Chroma's own clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.api.types import validate_embedding_function
from chromadb.config import Settings
from chromadb.utils.data_loaders import ImageLoader
from PIL import Image

from rge.integrations.chroma import RGEEmbeddingFunction

from .vectors import assert_same_vectors

QUERY = "What is in the image?"
TEXTS = ["A cat and a dog.", "A cat and a tiger."]
OFFLINE = Settings(anonymized_telemetry=False, allow_reset=True)


def test_function_gives_the_encoders_vectors_and_passes_chromas_checks(encoder, image_paths):
    embed = RGEEmbeddingFunction(encoder=encoder)
    validate_embedding_function(embed)
    pixels = np.asarray(Image.open(image_paths[0]).convert("RGB"))
    assert_same_vectors(embed(TEXTS), encoder.encode_document(TEXTS))
    mixed = embed([TEXTS[0], pixels, pixels.astype(np.int64), pixels / 255.0])  # Chroma's image dtypes
    assert_same_vectors(mixed, encoder.encode_document([TEXTS[0]] + [{"image": pixels}] * 3))
    assert_same_vectors(embed.embed_query([QUERY]), encoder.encode_query([QUERY]))
    assert_same_vectors(embed.embed_query([pixels]), encoder.encode_query([{"image": pixels}]))
    assert not np.allclose(embed.embed_query([QUERY])[0], embed([QUERY])[0])  # the query reasoned

    assert RGEEmbeddingFunction.name() == "rge" and not embed.is_legacy() and embed.default_space() == "cosine"
    config = embed.get_config()
    assert json.loads(json.dumps(config)) == config and config["model_name"] == str(encoder.checkpoint.path.resolve())
    assert RGEEmbeddingFunction.build_from_config(config).encoder is encoder  # no second copy of the model
    embed.validate_config_update(config, {**config, "batch_size": 2})
    with pytest.raises(ValueError, match="max_new_tokens"):
        embed.validate_config_update(config, {**config, "max_new_tokens": 4})


def test_collection_add_and_query(encoder, image_paths):
    client = chromadb.EphemeralClient(settings=OFFLINE)
    client.reset()  # in-memory clients with the same settings share their collections
    embed = RGEEmbeddingFunction(encoder=encoder, batch_size=2)
    collection = client.create_collection("docs", embedding_function=embed, data_loader=ImageLoader())
    pixels = np.asarray(Image.open(image_paths[0]).convert("RGB"))
    collection.add(ids=["dog", "tiger"], documents=TEXTS)
    collection.add(ids=["photo"], images=[pixels])
    collection.add(ids=["file"], uris=[image_paths[1]])  # read by Chroma's ImageLoader
    assert collection.configuration_json["hnsw"]["space"] == "cosine"

    found = collection.query(query_texts=[QUERY], n_results=4, include=["distances", "embeddings"])
    documents = encoder.encode_document([*TEXTS, {"image": pixels}, {"image": image_paths[1]}])
    scores = documents @ encoder.encode_query(QUERY)
    assert found["ids"][0] == [["dog", "tiger", "photo", "file"][i] for i in np.argsort(-scores)]
    np.testing.assert_allclose(found["distances"][0], 1 - np.sort(scores)[::-1], atol=1e-4)
    by_image = collection.query(query_images=[pixels], n_results=1, include=["distances"])
    best = documents @ encoder.encode_query({"image": pixels})
    np.testing.assert_allclose(by_image["distances"][0], [1 - best.max()], atol=1e-4)


def test_a_stored_collection_reopens_in_a_new_process(encoder, tmp_path):
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"), settings=OFFLINE)
    collection = client.create_collection("docs", embedding_function=RGEEmbeddingFunction(encoder=encoder))
    collection.add(ids=["dog", "tiger"], documents=TEXTS)
    here = collection.query(query_texts=[QUERY], n_results=2, include=["distances"])
    again = client.get_collection("docs").query(query_texts=[QUERY], n_results=2, include=["distances"])
    assert again["ids"] == here["ids"]  # rebuilt from the stored configuration, with this process's encoder

    code = f"""if True:
        import json, chromadb, rge.integrations.chroma
        from chromadb.config import Settings
        settings = Settings(anonymized_telemetry=False)
        client = chromadb.PersistentClient(path={str(tmp_path / "chroma")!r}, settings=settings)
        found = client.get_collection("docs").query(query_texts=[{QUERY!r}], n_results=2, include=["distances"])
        print(json.dumps([found["ids"][0], found["distances"][0]]))
    """
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ids, distances = json.loads(done.stdout.strip().splitlines()[-1])
    assert ids == here["ids"][0]
    np.testing.assert_allclose(distances, here["distances"][0], atol=1e-4)
