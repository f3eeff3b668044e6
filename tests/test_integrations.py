"""Adapters return exactly the encoder's own vectors: queries reason, documents do not."""

from __future__ import annotations

import asyncio
import importlib
import io
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from rge import RGEError
from rge.testing import make_test_image

QUERY = "What is in the image?"
DOCUMENTS = ["A cat and a dog.", "A cat and a tiger."]


def test_langchain(encoder, image_paths, tiny_path):
    from rge.integrations.langchain import RGEEmbeddings

    embeddings = RGEEmbeddings(encoder=encoder)
    assert embeddings.embed_query(QUERY) == encoder.encode_query(QUERY).tolist()
    assert embeddings.embed_documents(DOCUMENTS) == encoder.encode_document(DOCUMENTS).tolist()
    assert embeddings.embed_image(image_paths) == encoder.encode_document([{"image": p} for p in image_paths]).tolist()
    assert asyncio.run(embeddings.aembed_query(QUERY)) == embeddings.embed_query(QUERY)
    assert asyncio.run(embeddings.aembed_documents(DOCUMENTS)) == embeddings.embed_documents(DOCUMENTS)
    assert embeddings.embed_query(QUERY) != embeddings.embed_documents([QUERY])[0]
    by_name = RGEEmbeddings(model_name=str(tiny_path), device="cpu", max_new_tokens=encoder.max_new_tokens)
    np.testing.assert_allclose(by_name.embed_documents(DOCUMENTS), embeddings.embed_documents(DOCUMENTS), atol=1e-6)
    with pytest.raises(ValueError, match="either encoder"):
        RGEEmbeddings(encoder=encoder, model_name="MCG-NJU/RGE")


def test_llama_index(encoder, image_paths):
    from llama_index.core.embeddings import MultiModalEmbedding

    from rge.integrations.llama_index import RGEEmbedding

    model = RGEEmbedding(encoder=encoder)
    assert isinstance(model, MultiModalEmbedding) and RGEEmbedding.class_name() == "RGEEmbedding"
    assert model.get_query_embedding(QUERY) == encoder.encode_query(QUERY).tolist()
    assert model.get_text_embedding(DOCUMENTS[0]) == encoder.encode_document(DOCUMENTS[0]).tolist()
    np.testing.assert_allclose(model.get_text_embedding_batch(DOCUMENTS), encoder.encode_document(DOCUMENTS), atol=1e-6)
    expected_image = encoder.encode_document({"image": image_paths[0]}).tolist()
    assert model.get_image_embedding(image_paths[0]) == expected_image
    assert model.get_image_embedding(io.BytesIO(Path(image_paths[0]).read_bytes())) == expected_image
    assert asyncio.run(model.aget_query_embedding(QUERY)) == model.get_query_embedding(QUERY)
    assert asyncio.run(model.aget_image_embedding(image_paths[1])) == model.get_image_embedding(image_paths[1])


def test_llama_index_async_runs_batched_off_the_event_loop(encoder, image_paths, monkeypatch):
    import threading

    from rge.integrations.llama_index import RGEEmbedding

    model = RGEEmbedding(encoder=encoder)
    calls = []
    original = encoder.encode_document

    def spy(texts=None, **kwargs):
        items = texts if texts is not None else kwargs["images"]
        on_loop_thread = threading.current_thread() is threading.main_thread()
        calls.append((on_loop_thread, len(items) if isinstance(items, list) else 1))
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode_document", spy)
    texts = asyncio.run(model.aget_text_embedding_batch(DOCUMENTS * 2))
    images = asyncio.run(model.aget_image_embedding_batch(image_paths))
    single = asyncio.run(model.aget_text_embedding(DOCUMENTS[0]))
    assert calls == [(False, 4), (False, 2), (False, 1)]  # worker threads, one call per batch
    np.testing.assert_allclose(texts, original(DOCUMENTS * 2), atol=1e-6)
    np.testing.assert_allclose(images, original([{"image": p} for p in image_paths]), atol=1e-6)
    np.testing.assert_allclose(single, original(DOCUMENTS[0]), atol=1e-6)


def test_llama_index_takes_every_base_embedding_field(encoder, tiny_path, monkeypatch):
    """LlamaIndex's own fields are fields, never loading options (with encoder= and with model_name=), and
    LlamaIndex uses them: callbacks fire, batch size, rate limiter and cache apply, workers run async batches."""
    import llama_index.core.base.embeddings.base as llama_base
    from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
    from llama_index.core.embeddings import MultiModalEmbedding
    from llama_index.core.rate_limiter import TokenBucketRateLimiter
    from llama_index.core.storage.kvstore import SimpleKVStore

    from rge.integrations.llama_index import RGEEmbedding

    for name, field in MultiModalEmbedding.model_fields.items():  # each field alone, at its default
        if name != "model_name":
            RGEEmbedding(encoder=encoder, **{name: field.get_default(call_default_factory=True)})
    calls, workers = [], []
    original, run_jobs = encoder.encode_document, llama_base.run_jobs

    def counting(texts, **options):
        calls.append(len(texts))
        return original(texts, **options)

    def watching(jobs, **options):
        workers.append(options["workers"])
        return run_jobs(jobs, **options)

    monkeypatch.setattr(encoder, "encode_document", counting)
    monkeypatch.setattr(llama_base, "run_jobs", watching)
    debug, cache, limiter, acquired = LlamaDebugHandler(), SimpleKVStore(), TokenBucketRateLimiter(), []
    monkeypatch.setattr(TokenBucketRateLimiter, "acquire", lambda self, *args, **kwargs: acquired.append(1))
    model = RGEEmbedding(encoder=encoder, callback_manager=CallbackManager([debug]), num_workers=2, embed_batch_size=1,
                         embeddings_cache=cache, rate_limiter=limiter)  # fmt: skip
    assert (model.num_workers, model.embed_batch_size, model.rate_limiter) == (2, 1, limiter)
    assert model.embeddings_cache is cache
    vectors = model.get_text_embedding_batch(DOCUMENTS)
    np.testing.assert_allclose(vectors, original(DOCUMENTS), atol=1e-6)
    assert calls == [1, 1] and len(debug.get_event_pairs(CBEventType.EMBEDDING)) == 2  # batches of 1, each an event
    assert len(acquired) == 2  # the rate limiter was asked before each batch
    assert cache.get(DOCUMENTS[0], collection="embeddings") is not None
    assert model.get_text_embedding_batch(DOCUMENTS) == vectors and calls == [1, 1]  # from the cache
    more = ["A red car.", "A blue boat.", "A green tree."]
    np.testing.assert_allclose(asyncio.run(model.aget_text_embedding_batch(more)), original(more), atol=1e-6)
    assert workers == [2] and calls == [1, 1, 1, 1, 1]

    by_name = RGEEmbedding(model_name=str(tiny_path), device="cpu", max_new_tokens=encoder.max_new_tokens,
                           callback_manager=CallbackManager([debug]), num_workers=2, embed_batch_size=3)  # fmt: skip
    assert (by_name.model_name, by_name.num_workers, by_name.embed_batch_size) == (str(tiny_path), 2, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_option'"):
        RGEEmbedding(model_name=str(tiny_path), no_such_option=1)  # the rest still goes to from_pretrained


def test_sentence_transformers(encoder, image_paths, tmp_path):
    from rge.integrations.sentence_transformers import to_sentence_transformer

    model = to_sentence_transformer(encoder)
    image = make_test_image(70, 50, seed=9)
    unit = {"normalize_embeddings": True}
    queries = [QUERY, {"text": "Describe it.", "image": image}]
    documents = [DOCUMENTS[0], image, {"text": "caption", "image": image_paths[0]}]
    np.testing.assert_allclose(model.encode_query(queries, **unit), encoder.encode_query(queries), atol=1e-6)
    expected_documents = encoder.encode_document([DOCUMENTS[0], {"image": image}, documents[2]])
    np.testing.assert_allclose(model.encode_document(documents, **unit), expected_documents, atol=1e-6)
    np.testing.assert_allclose(model.encode_query(QUERY, **unit), encoder.encode_query(QUERY), atol=1e-6)
    raw = model.encode_document(DOCUMENTS, normalize_embeddings=False)  # honoured: the raw <emb> states
    np.testing.assert_allclose(raw, encoder.encode_document(DOCUMENTS, normalize=False), atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    scores = model.similarity(model.encode_query(queries), model.encode_document(documents))
    np.testing.assert_allclose(scores.numpy(), encoder.similarity(encoder.encode_query(queries), expected_documents),
                               atol=1e-5)  # fmt: skip
    message = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}
    ]
    np.testing.assert_allclose(model.encode_query([message], **unit), encoder.encode_query([queries[1]]), atol=1e-6)
    # a path (or URL) string is the image it names, never embedded as text
    by_path = model.encode_document([image_paths[0]], **unit)
    np.testing.assert_allclose(by_path, encoder.encode_document([{"image": image_paths[0]}]), atol=1e-6)
    assert model.get_embedding_dimension() == encoder.embedding_dim
    with pytest.raises(ValueError, match="token_embeddings' is not available"):
        model.encode_document(DOCUMENTS, output_value="token_embeddings")


def test_sentence_transformers_takes_task_names_as_the_encoder_does(encoder):
    """``prompt_name="vqa"`` is the side's prompt, as ``RGEEncoder.encode`` reads it; the full names still work."""
    from rge.integrations.sentence_transformers import to_sentence_transformer

    model = to_sentence_transformer(encoder)
    unit = {"normalize_embeddings": True}
    for method, side, reason in (("encode_query", "query", True), ("encode_document", "document", False)):
        expected = encoder.encode([QUERY], reason=reason, prompt_name="vqa")
        np.testing.assert_allclose(getattr(model, method)([QUERY], prompt_name="vqa", **unit), expected, atol=1e-6)
        full = getattr(model, method)([QUERY], prompt_name=f"vqa_{side}", **unit)
        np.testing.assert_allclose(full, expected, atol=1e-6)
    assert not np.allclose(expected, encoder.encode([QUERY], reason=False), atol=1e-3)  # the prompt is there
    np.testing.assert_allclose(model.encode([QUERY], prompt_name="vqa", **unit), expected, atol=1e-6)  # documents


def test_sentence_transformers_save_and_load_keep_every_setting(tiny_path, tmp_path, monkeypatch, image_paths):
    """Reloaded from its folder, the model gives the same image vectors: budget, length, dtype, decoding and
    the checkpoint reference (hub id and revision, not a cache path) survive; load options are honoured."""
    import huggingface_hub.constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from sentence_transformers import SentenceTransformer

    from rge import RGEEncoder, RGEModelNotFoundError
    from rge.integrations.sentence_transformers import to_sentence_transformer
    from rge.testing import install_in_hf_cache

    install_in_hf_cache(tiny_path, "MCG-NJU/RGE", tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    encoder = RGEEncoder.from_pretrained(
        "MCG-NJU/RGE", cache_dir=tmp_path / "hub", device="cpu", dtype="bfloat16", min_pixels=4 * 28 * 28,
        max_pixels=9 * 28 * 28, max_new_tokens=5, max_length=900, repetition_penalty=1.2,
    )  # fmt: skip
    model = to_sentence_transformer(encoder)
    model.save(str(tmp_path / "st"))
    saved = next((tmp_path / "st").glob("**/config.json")).read_text()
    assert '"MCG-NJU/RGE"' in saved and str(tmp_path / "hub") not in saved and '"0000000000' in saved
    reloaded = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, device="cpu",
                                   cache_folder=str(tmp_path / "hub"))  # fmt: skip
    module = reloaded[0]
    assert (module.min_pixels, module.max_pixels, module.max_length, module.dtype) == (
        4 * 784,
        9 * 784,
        900,
        "bfloat16",
    )
    assert module.encoder.generation_settings.repetition_penalty == 1.2 and module.encoder.max_new_tokens == 5
    items = [{"image": image_paths[0]}, "What is in the image?"]
    for task in ("encode_document", "encode_query"):
        np.testing.assert_array_equal(getattr(reloaded, task)(items), getattr(model, task)(items))
        by_task = getattr(reloaded, task)(items, prompt_name="vqa")  # task names survive the round trip
        np.testing.assert_array_equal(by_task, getattr(model, task)(items, prompt_name=f"vqa_{task[7:]}"))
    overridden = SentenceTransformer(
        str(tmp_path / "st"), trust_remote_code=True, device="cpu", cache_folder=str(tmp_path / "hub"),
        model_kwargs={"max_new_tokens": 2},
    )  # fmt: skip
    assert overridden[0].encoder.max_new_tokens == 2
    with pytest.raises(RGEModelNotFoundError) as raised:  # the cache folder given really is the one used
        SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, device="cpu",
                            cache_folder=str(tmp_path / "empty"))  # fmt: skip
    assert isinstance(raised.value.__cause__, LocalEntryNotFoundError)


def test_mteb_encode_and_evaluate(encoder):
    import mteb
    from mteb.mocks.mock_tasks.retrieval import MockAny2AnyRetrievalI2TTask, MockAny2AnyRetrievalT2ITask
    from mteb.types import PromptType
    from torch.utils.data import DataLoader

    from rge.integrations.mteb import RGE_MODEL_META, RGEMtebModel

    model = RGEMtebModel(encoder=encoder, batch_size=2)
    image = make_test_image(64, 64, seed=4)
    rows = [{"text": QUERY, "image": image}, {"text": DOCUMENTS[0], "image": image}]
    loader = DataLoader(rows, batch_size=1, collate_fn=lambda batch: {k: [r[k] for r in batch] for k in batch[0]})
    task = MockAny2AnyRetrievalT2ITask()
    for prompt_type, reason in ((PromptType.query, True), (PromptType.document, False), (None, False)):
        got = model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                           prompt_type=prompt_type)  # fmt: skip
        np.testing.assert_allclose(got, encoder.encode(rows, reason=reason), atol=1e-6)

    sides = []
    original = encoder.encode

    def spy(items, **kwargs):
        sides.append((kwargs["reason"], tuple(sorted(items[0]))))
        return original(items, **kwargs)

    model.encoder.encode = spy
    try:
        result = mteb.evaluate(model, [MockAny2AnyRetrievalT2ITask(), MockAny2AnyRetrievalI2TTask()], cache=None,
                               show_progress_bar=False)  # fmt: skip
    finally:
        del model.encoder.encode
    assert {(reason, keys) for reason, keys in sides} == {
        (True, ("text",)), (False, ("image", "text")), (True, ("image", "text")), (False, ("text",))
    }  # fmt: skip
    evaluated = sorted(r.task_name for r in result.task_results)
    assert evaluated == ["MockAny2AnyRetrievalI2T", "MockAny2AnyRetrievalT2I"]  # each task evaluated, once
    assert RGE_MODEL_META.modalities == ["image", "text"] and RGE_MODEL_META.embed_dim == 2048


def test_mteb_metadata_and_cache_follow_the_checkpoint(encoder, tiny_path, tmp_path, monkeypatch):
    """Two checkpoints never share mteb results: the second one is evaluated, not read from the cache."""
    import huggingface_hub.constants
    import mteb
    from mteb.cache import ResultCache
    from mteb.mocks.mock_tasks.retrieval import MockAny2AnyRetrievalT2ITask

    from rge import RGEEncoder
    from rge.integrations.mteb import RGEMtebModel
    from rge.testing import build_tiny_checkpoint, install_in_hf_cache

    other = RGEEncoder.from_pretrained(build_tiny_checkpoint(tmp_path / "other", seed=5), device="cpu",
                                       max_new_tokens=4)  # fmt: skip
    first, second = RGEMtebModel(encoder=encoder), RGEMtebModel(encoder=other)
    assert first.mteb_model_meta.name == f"local/{tiny_path.name}" and first.mteb_model_meta.revision.startswith(
        "local-"
    )
    assert first.mteb_model_meta.revision != second.mteb_model_meta.revision
    install_in_hf_cache(tiny_path, "MCG-NJU/RGE", tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from_hub = RGEMtebModel("MCG-NJU/RGE", cache_dir=tmp_path / "hub", device="cpu", max_new_tokens=4)
    assert (from_hub.mteb_model_meta.name, from_hub.mteb_model_meta.revision) == ("MCG-NJU/RGE", "0" * 40)

    cache = ResultCache(tmp_path / "mteb-cache")
    encoded = []
    for model in (first, second, first):
        calls = []
        original = model.encoder.encode
        model.encoder.encode = lambda *a, _calls=calls, _original=original, **k: _calls.append(1) or _original(*a, **k)
        try:
            mteb.evaluate(model, [MockAny2AnyRetrievalT2ITask()], cache=cache, show_progress_bar=False)
        finally:
            del model.encoder.encode
        encoded.append(len(calls))
    assert encoded[0] > 0 and encoded[1] > 0  # the second checkpoint is evaluated, not served the first's results
    assert encoded[2] == 0  # while the first one's rerun really comes from the cache


@pytest.mark.parametrize(
    "module, extra, package",
    [("langchain", "langchain", "langchain_core"), ("llama_index", "llama-index", "llama_index.core"),
     ("sentence_transformers", "sentence-transformers", "sentence_transformers"), ("mteb", "mteb", "mteb"),
     ("haystack", "haystack", "haystack"), ("chroma", "chroma", "chromadb"), ("lancedb", "lancedb", "lancedb")],
)  # fmt: skip
def test_missing_extra_names_it(monkeypatch, module, extra, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes "import package" fail
    monkeypatch.delitem(sys.modules, f"rge.integrations.{module}", raising=False)
    with pytest.raises(ImportError) as raised:  # an RGEMissingExtraError, which is an ImportError
        importlib.import_module(f"rge.integrations.{module}")
    top = package.partition(".")[0]
    assert str(raised.value) == f'rge.integrations.{module} needs {top}: pip install "rge-embeddings[{extra}]"'
    assert isinstance(raised.value, RGEError)


def test_importing_rge_imports_no_adapter_library():
    adapters = "('langchain_core', 'llama_index', 'mteb', 'sentence_transformers', 'haystack', 'chromadb', 'lancedb')"
    code = f"import sys, rge; print(sorted(m for m in {adapters} if m in sys.modules))"
    from .processes import run_bounded

    out = run_bounded([sys.executable, "-c", code], timeout=300, check=True).stdout
    assert out.strip() == "[]"


def test_faiss_example_runs_end_to_end(encoder, capsys):
    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "rag_faiss.py"))
    hits, rationales = example["search"](encoder, example["QUERIES"], top_k=3)
    items, labels = example["build_corpus"]()
    documents = encoder.encode_document(items)
    queries = encoder.encode_query(example["QUERIES"])
    for row, query in zip(hits, queries):
        order = np.argsort(-(documents @ query))[:3]
        assert [hit.document for hit in row] == [labels[i] for i in order]
        np.testing.assert_allclose([hit.score for hit in row], (documents @ query)[order], atol=1e-5)
    assert rationales == list(encoder.encode_query(example["QUERIES"], return_rationales=True)[1])
    assert len(example["main"](["--tiny", "--top-k", "2"])) == len(example["QUERIES"])
    out = capsys.readouterr().out
    assert out.count("rationale:") == len(example["QUERIES"])
    assert all(f"query:     {query}" in out for query in example["QUERIES"])
    assert out.count("  2. ") == len(example["QUERIES"]) and "  3. " not in out
