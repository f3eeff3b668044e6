"""LanceDB: the ``"rge"`` embedding function; inserts embed documents, searches reason.

>>> from lancedb.embeddings import get_registry
>>> from lancedb.pydantic import LanceModel, Vector
>>> import rge.integrations.lancedb                        # registers "rge"
>>> rge_fn = get_registry().get("rge").create(model_name="MCG-NJU/RGE")   # or .create(encoder=encoder)
>>> class Document(LanceModel):                                            # doctest: +SKIP
...     text: str = rge_fn.SourceField()
...     vector: Vector(rge_fn.ndims()) = rge_fn.VectorField()

A table keeps the function's configuration and rebuilds it when opened again (import this module first).
"""

from __future__ import annotations

from typing import Any

from ..errors import require_extra
from ..types import PromptName
from ._shared import saved_config, shared_encoder, side_prompts

require_extra("lancedb", extra="lancedb", needed_by=__name__)

import numpy as np  # noqa: E402
from lancedb.embeddings import EmbeddingFunction, register  # noqa: E402
from pydantic import ConfigDict, PrivateAttr  # noqa: E402

from ..encoder import RGEEncoder  # noqa: E402


@register("rge")
class RGEEmbeddingFunction(EmbeddingFunction):  # type: ignore[misc]
    """Source values are documents (candidate path), queries reason.

    A source column of strings holds texts, or, with ``image_uris=True``, image paths and URLs; a column of
    binary values holds encoded images (LanceDB's image bytes). A query is a text, an image (bytes or PIL)
    or a ``{"text": ..., "image": ...}`` dict. Any option beyond the fields below is a ``from_pretrained``
    option; ``token`` must be a LanceDB variable (``"$var:hf_token"``), never a literal. Failures are not
    retried: the model runs here, a retry would fail alike, so its error reaches the caller as raised.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_name: str
    batch_size: int = 16
    prompt_name: PromptName | None = None
    query_prompt: str | None = None
    document_prompt: str | None = None
    image_uris: bool = False
    _encoder: RGEEncoder = PrivateAttr()
    _query: dict[str, Any] = PrivateAttr()
    _document: dict[str, Any] = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        self._query, self._document = side_prompts(self.prompt_name, self.query_prompt, self.document_prompt)
        self._encoder = shared_encoder(None, self.model_name, dict(self.model_extra or {}))

    @classmethod
    def create(cls, encoder: RGEEncoder | None = None, **kwargs: Any) -> RGEEmbeddingFunction:
        """The function for ``model_name=`` and its options, or for ``encoder=``: then the table keeps a
        reference to its checkpoint and every setting that changes a vector, and this process uses it as is."""
        if encoder is not None:
            load = {key: value for key, value in kwargs.items() if key not in cls.model_fields}
            kwargs = {**kwargs, **saved_config(encoder, kwargs.get("model_name"), load)}
            shared_encoder(encoder, None, {})
        return super().create(**kwargs)  # type: ignore[no-any-return]

    @staticmethod
    def sensitive_keys() -> list[str]:
        return ["token"]

    @property
    def encoder(self) -> RGEEncoder:
        return self._encoder

    def ndims(self) -> int:
        return self._encoder.embedding_dim

    def compute_source_embeddings(self, texts: Any, *args: Any, **kwargs: Any) -> list[np.ndarray | None]:
        """Embed a batch of the source column on the candidate path; a null value gets no vector."""
        values = [texts] if isinstance(texts, (str, bytes)) else self.sanitize_input(texts)
        present = [index for index, value in enumerate(values) if value is not None]
        items = [self._document_item(values[index]) for index in present]
        vectors: list[np.ndarray | None] = [None] * len(values)
        if items:
            embedded = self._encoder.encode_document(items, batch_size=self.batch_size, **self._document)
            for index, vector in zip(present, embedded):
                vectors[index] = vector
        return vectors

    def compute_query_embeddings(self, query: Any, *args: Any, **kwargs: Any) -> list[np.ndarray | None]:  # type: ignore[override]
        """Embed one query on the reasoning path."""
        item = query if isinstance(query, dict) else {"text": query} if isinstance(query, str) else {"image": query}
        return [self._encoder.encode_query([item], **self._query)[0]]

    def compute_source_embeddings_with_retry(self, *args: Any, **kwargs: Any) -> list[np.ndarray | None]:
        return self.compute_source_embeddings(*args, **kwargs)

    def compute_query_embeddings_with_retry(self, *args: Any, **kwargs: Any) -> list[np.ndarray | None]:
        return self.compute_query_embeddings(*args, **kwargs)

    def _document_item(self, value: Any) -> dict[str, Any]:
        if isinstance(value, bytes) or (isinstance(value, str) and self.image_uris):
            return {"image": value}
        return {"text": value}
