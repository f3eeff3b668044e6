"""LlamaIndex: ``RGEEmbedding``, a ``MultiModalEmbedding`` whose queries reason and documents do not.

>>> from rge.integrations.llama_index import RGEEmbedding
>>> embed_model = RGEEmbedding(model_name="MCG-NJU/RGE")     # or RGEEmbedding(encoder=encoder)
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

from ..errors import require_extra
from ._shared import model_label, resolve_encoder, side_prompts

require_extra("llama_index.core", extra="llama-index", needed_by=__name__)

from llama_index.core.embeddings import MultiModalEmbedding  # noqa: E402
from pydantic import PrivateAttr  # noqa: E402

from ..encoder import RGEEncoder  # noqa: E402
from ..types import PromptName  # noqa: E402


class RGEEmbedding(MultiModalEmbedding):  # type: ignore[misc]
    """Query embeddings take the reasoning path; text and image embeddings the candidate path.

    The async methods run the encoder in a worker thread, batched as the sync ones, so the event loop is
    never blocked by the model. ``prompt_name`` (a task of ``rge.prompts.TASK_PROMPTS``) or
    ``query_prompt`` / ``document_prompt`` put an instruction before each text. Every field of LlamaIndex's
    ``BaseEmbedding`` (``callback_manager``, ``num_workers``, ``embeddings_cache``, ``rate_limiter``, ...) is
    accepted and used as LlamaIndex uses it; the other keyword arguments are ``from_pretrained`` options.
    """

    _encoder: Any = PrivateAttr()
    _query: dict[str, Any] = PrivateAttr()
    _document: dict[str, Any] = PrivateAttr()

    def __init__(
        self,
        encoder: RGEEncoder | None = None,
        *,
        model_name: str | None = None,
        embed_batch_size: int = 16,
        prompt_name: PromptName | None = None,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        **load_kwargs: Any,
    ) -> None:
        fields = {key: load_kwargs.pop(key) for key in list(load_kwargs) if key in type(self).model_fields}
        resolved = resolve_encoder(encoder, model_name, load_kwargs)
        super().__init__(model_name=model_label(resolved, model_name), embed_batch_size=embed_batch_size, **fields)
        self._encoder = resolved
        self._query, self._document = side_prompts(prompt_name, query_prompt, document_prompt)

    @classmethod
    def class_name(cls) -> str:
        return "RGEEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._encoder.encode_query(query, **self._query).tolist()  # type: ignore[no-any-return]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._encoder.encode_document(text, **self._document).tolist()  # type: ignore[no-any-return]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        vectors = self._encoder.encode_document(texts, batch_size=self.embed_batch_size, **self._document)
        return vectors.tolist()  # type: ignore[no-any-return]

    def _get_image_embedding(self, img_file_path: str | io.BytesIO) -> list[float]:
        return self._get_image_embeddings([img_file_path])[0]

    def _get_image_embeddings(self, img_file_paths: list[str | io.BytesIO]) -> list[list[float]]:
        images = [_image(path) for path in img_file_paths]
        vectors = self._encoder.encode_document(images=images, batch_size=self.embed_batch_size, **self._document)
        return vectors.tolist()  # type: ignore[no-any-return]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    async def _aget_image_embedding(self, img_file_path: str | io.BytesIO) -> list[float]:
        return await asyncio.to_thread(self._get_image_embedding, img_file_path)

    async def _aget_image_embeddings(self, img_file_paths: list[str | io.BytesIO]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_image_embeddings, img_file_paths)


def _image(source: str | io.BytesIO) -> str | bytes:
    return source.getvalue() if isinstance(source, io.BytesIO) else source
