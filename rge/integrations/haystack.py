"""Haystack: ``RGETextEmbedder`` (queries reason) and ``RGEDocumentEmbedder`` (texts and images, candidate path).

>>> from rge.integrations.haystack import RGEDocumentEmbedder, RGETextEmbedder
>>> document_embedder = RGEDocumentEmbedder(model_name="MCG-NJU/RGE")   # or RGEDocumentEmbedder(encoder=encoder)
>>> text_embedder = RGETextEmbedder(model_name="MCG-NJU/RGE")           # the model is loaded once per process
"""

from __future__ import annotations

import base64
import mimetypes
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import require_extra
from ..types import PromptName
from ._shared import saved_config, shared_encoder, side_prompts

require_extra("haystack", extra="haystack", needed_by=__name__)

from haystack import Document, component, default_from_dict, default_to_dict  # noqa: E402
from haystack.dataclasses import ImageContent  # noqa: E402

from ..encoder import RGEEncoder  # noqa: E402


class _RGEComponent:
    """What both embedders share: the model (given, or loaded in ``warm_up``) and its saved configuration.

    ``to_dict`` saves ``model_name`` and the loading options, or, for an ``encoder`` passed in, a reference to
    its checkpoint (hub id and revision, or local directory) with every setting that changes a vector: the
    encoder itself is not serialized, ``from_dict`` loads that checkpoint again (in this process it reuses the
    encoder while it lives). A ``token`` string is never saved; the environment's Hugging Face login serves.
    """

    def _setup(self, encoder: RGEEncoder | None, model_name: str | None, load_kwargs: dict[str, Any]) -> None:
        self._saved = saved_config(encoder, model_name, load_kwargs)
        self._model_name, self._load_kwargs = model_name, load_kwargs
        self._encoder = None if encoder is None else shared_encoder(encoder, None, {})

    def warm_up(self) -> None:
        """Load the model (once per process for a given configuration); nothing to do with ``encoder=``."""
        if self._encoder is None:
            self._encoder = shared_encoder(None, self._model_name, self._load_kwargs)

    @property
    def encoder(self) -> RGEEncoder:
        self.warm_up()
        return self._encoder  # type: ignore[return-value]

    def _to_dict(self, **options: Any) -> dict[str, Any]:
        return default_to_dict(self, **self._saved, **options)


@component
class RGETextEmbedder(_RGEComponent):
    """Embeds a query on the reasoning path: ``run(text=...)`` -> ``{"embedding": list[float]}``.

    An optional ``image`` (Haystack's ``ImageContent``) makes it a multimodal query. ``prompt_name`` (a task
    of ``rge.prompts.TASK_PROMPTS``) or ``query_prompt`` puts an instruction before the text.
    """

    def __init__(
        self,
        encoder: RGEEncoder | None = None,
        *,
        model_name: str | None = None,
        prompt_name: PromptName | None = None,
        query_prompt: str | None = None,
        **load_kwargs: Any,
    ) -> None:
        self._setup(encoder, model_name, load_kwargs)
        self.prompt_name, self.query_prompt = prompt_name, query_prompt
        self._prompt = side_prompts(prompt_name, query_prompt, None)[0]

    def to_dict(self) -> dict[str, Any]:
        return self._to_dict(prompt_name=self.prompt_name, query_prompt=self.query_prompt)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RGETextEmbedder:
        return default_from_dict(cls, data)

    @component.output_types(embedding=list[float])
    def run(self, text: str, image: ImageContent | None = None) -> dict[str, Any]:
        """Embed ``text`` (with ``image``, if given) on the reasoning path."""
        if not isinstance(text, str):
            raise TypeError("RGETextEmbedder embeds one str; embed documents with RGEDocumentEmbedder")
        item: dict[str, Any] = {"text": text}
        if image is not None:
            item["image"] = base64.b64decode(image.base64_image)
        return {"embedding": self.encoder.encode_query([item], **self._prompt)[0].tolist()}


@component
class RGEDocumentEmbedder(_RGEComponent):
    """Embeds documents on the candidate path and returns copies that carry their ``embedding``.

    A document's text is its ``content``, after the values of ``meta_fields_to_embed`` joined by
    ``embedding_separator`` (as Haystack's own document embedders do). Its image, embedded with that text, is
    its ``blob`` when the blob's MIME type is an image, else the file that ``meta[file_path_meta_field]`` names
    when that is an image (by ``meta["mime_type"]`` or the file name; a path or http(s) URL, relative to
    ``root_path`` if given, and then required to stay inside it). A document whose file is not an image (the
    PDF or text file it was converted from) is embedded as text.
    """

    def __init__(
        self,
        encoder: RGEEncoder | None = None,
        *,
        model_name: str | None = None,
        batch_size: int = 16,
        prompt_name: PromptName | None = None,
        document_prompt: str | None = None,
        meta_fields_to_embed: list[str] | None = None,
        embedding_separator: str = "\n",
        file_path_meta_field: str = "file_path",
        root_path: str | None = None,
        **load_kwargs: Any,
    ) -> None:
        self._setup(encoder, model_name, load_kwargs)
        self.batch_size, self.prompt_name, self.document_prompt = batch_size, prompt_name, document_prompt
        self.meta_fields_to_embed = list(meta_fields_to_embed or [])
        self.embedding_separator = embedding_separator
        self.file_path_meta_field, self.root_path = file_path_meta_field, root_path
        self._prompt = side_prompts(prompt_name, None, document_prompt)[1]

    def to_dict(self) -> dict[str, Any]:
        return self._to_dict(
            batch_size=self.batch_size, prompt_name=self.prompt_name, document_prompt=self.document_prompt,
            meta_fields_to_embed=self.meta_fields_to_embed, embedding_separator=self.embedding_separator,
            file_path_meta_field=self.file_path_meta_field, root_path=self.root_path,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RGEDocumentEmbedder:
        return default_from_dict(cls, data)

    @component.output_types(documents=list[Document])
    def run(self, documents: list[Document]) -> dict[str, Any]:
        """Embed ``documents`` (texts, images or both) on the candidate path."""
        if not isinstance(documents, list) or not all(isinstance(document, Document) for document in documents):
            raise TypeError("RGEDocumentEmbedder embeds a list of Documents; embed a query with RGETextEmbedder")
        if not documents:
            return {"documents": []}
        items = [self._item(document) for document in documents]
        vectors = self.encoder.encode_document(items, batch_size=self.batch_size, **self._prompt)
        return {"documents": [replace(doc, embedding=vector.tolist()) for doc, vector in zip(documents, vectors)]}

    def _item(self, document: Document) -> dict[str, Any]:
        meta = [str(document.meta[key]) for key in self.meta_fields_to_embed if document.meta.get(key) is not None]
        item: dict[str, Any] = {"text": self.embedding_separator.join([*meta, document.content or ""])}
        image = self._image(document)
        if image is not None:
            item["image"] = image
        return item

    def _image(self, document: Document) -> str | bytes | None:
        if document.blob is not None and (document.blob.mime_type or "").startswith("image/"):
            return document.blob.data
        path = document.meta.get(self.file_path_meta_field)
        if path is None:
            return None
        mime_type = document.meta.get("mime_type") or mimetypes.guess_type(str(path))[0]
        if not (mime_type or "").startswith("image/"):
            return None
        if str(path).startswith(("http://", "https://")) or not self.root_path:
            return str(path)
        resolved, root = Path(self.root_path, path).resolve(), Path(self.root_path).resolve()
        if not resolved.is_relative_to(root):
            raise ValueError(f"document {document.id}: {path!r} is outside root_path {self.root_path!r}")
        return str(resolved)
