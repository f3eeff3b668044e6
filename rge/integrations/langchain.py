"""LangChain: ``RGEEmbeddings``, queries reason and documents do not.

>>> from rge.integrations.langchain import RGEEmbeddings
>>> embeddings = RGEEmbeddings(model_name="MCG-NJU/RGE")      # or RGEEmbeddings(encoder=encoder)
>>> embeddings.embed_query("What is in the image?")          # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import require_extra
from ._shared import resolve_encoder, side_prompts

require_extra("langchain_core", extra="langchain", needed_by=__name__)

from langchain_core.embeddings import Embeddings  # noqa: E402

from ..encoder import RGEEncoder  # noqa: E402
from ..types import PromptName  # noqa: E402


class RGEEmbeddings(Embeddings):
    """A ``langchain_core.embeddings.Embeddings`` backed by an RGE encoder.

    ``embed_query`` takes the reasoning path, ``embed_documents`` the candidate path; ``embed_image``
    embeds image documents (paths or URLs), which vector stores such as Chroma look for. ``prompt_name``
    (a task of ``rge.prompts.TASK_PROMPTS``, e.g. ``"vqa"``) or ``query_prompt`` / ``document_prompt``
    put an instruction before each text.
    """

    def __init__(
        self,
        encoder: RGEEncoder | None = None,
        *,
        model_name: str | None = None,
        batch_size: int = 16,
        prompt_name: PromptName | None = None,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        **load_kwargs: Any,
    ) -> None:
        self.encoder = resolve_encoder(encoder, model_name, load_kwargs)
        self.batch_size = batch_size
        self._query, self._document = side_prompts(prompt_name, query_prompt, document_prompt)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        vectors = self.encoder.encode_document(list(texts), batch_size=self.batch_size, **self._document)
        return vectors.tolist()  # type: ignore[no-any-return]

    def embed_query(self, text: str) -> list[float]:
        return self.encoder.encode_query(text, **self._query).tolist()  # type: ignore[no-any-return]

    def embed_image(self, uris: list[str]) -> list[list[float]]:
        """Embed images given as paths or URLs, on the candidate path."""
        vectors = self.encoder.encode_document(images=list(uris), batch_size=self.batch_size, **self._document)
        return vectors.tolist()  # type: ignore[no-any-return]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)
