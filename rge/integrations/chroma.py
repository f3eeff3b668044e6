"""Chroma: ``RGEEmbeddingFunction``, documents (texts and images) on the candidate path, queries reasoning.

>>> import chromadb
>>> from rge.integrations.chroma import RGEEmbeddingFunction
>>> embed = RGEEmbeddingFunction(model_name="MCG-NJU/RGE")     # or RGEEmbeddingFunction(encoder=encoder)
>>> collection = chromadb.Client().create_collection("docs", embedding_function=embed)  # doctest: +SKIP

Importing this module registers the function with Chroma as ``"rge"``: a collection stores its configuration
and is reopened with ``client.get_collection("docs")`` (import the module first), without passing it again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import require_extra
from ..types import PromptName
from ._shared import VECTOR_SETTINGS, saved_config, shared_encoder, side_prompts

require_extra("chromadb", extra="chroma", needed_by=__name__)

from chromadb.api.types import Embeddable, EmbeddingFunction, Embeddings, Space  # noqa: E402
from chromadb.utils.embedding_functions import register_embedding_function  # noqa: E402

from ..encoder import RGEEncoder  # noqa: E402


@register_embedding_function
class RGEEmbeddingFunction(EmbeddingFunction[Embeddable]):  # type: ignore[misc]
    """Chroma's ``EmbeddingFunction``: calls embed documents (``Documents``, ``Images`` or both mixed),
    ``embed_query`` (what ``collection.query`` uses) reasons.

    Images are Chroma's numpy arrays (HWC; uint8, whole numbers in [0, 255] or floats in [0, 1]), such as
    ``chromadb.utils.data_loaders.ImageLoader`` reads from ``uris``. ``prompt_name`` (a task of
    ``rge.prompts.TASK_PROMPTS``) or ``query_prompt`` / ``document_prompt`` put an instruction before each text.
    The configuration (``get_config``) names the model and its loading options, or, for an ``encoder`` passed
    in, its checkpoint and every setting that changes a vector; a ``token`` string is never saved.
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
        self._query, self._document = side_prompts(prompt_name, query_prompt, document_prompt)
        adapter = {"batch_size": batch_size, "prompt_name": prompt_name, "query_prompt": query_prompt,
                   "document_prompt": document_prompt}  # fmt: skip
        self._config = {**saved_config(encoder, model_name, load_kwargs), **_without_none(adapter)}
        self.encoder = shared_encoder(encoder, model_name, load_kwargs)
        self.batch_size = batch_size

    def __call__(self, input: Embeddable) -> Embeddings:
        """Embed documents on the candidate path: texts and images, in order."""
        vectors = self.encoder.encode_document(_items(input), batch_size=self.batch_size, **self._document)
        return list(vectors)

    def embed_query(self, input: Embeddable) -> Embeddings:
        """Embed queries (texts or images) on the reasoning path."""
        vectors = self.encoder.encode_query(_items(input), batch_size=self.batch_size, **self._query)
        return list(vectors)

    @staticmethod
    def name() -> str:
        return "rge"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine", "ip", "l2"]  # unit vectors: the three rank alike

    def get_config(self) -> dict[str, Any]:
        return dict(self._config)

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> RGEEmbeddingFunction:
        """The function ``get_config`` describes; a model this process already holds is reused, not reloaded."""
        return RGEEmbeddingFunction(**config)

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        """Refuse a change of model, vector setting or prompt: the vectors already stored would no longer match."""
        keys = (*VECTOR_SETTINGS, "prompt_name", "query_prompt", "document_prompt")
        changed = [key for key in keys if old_config.get(key) != new_config.get(key)]
        if changed:
            raise ValueError(f"changing {changed} would make new vectors unlike those already stored")


def _items(input: Embeddable) -> list[dict[str, Any]]:
    return [{"image": _pixels(item)} if isinstance(item, np.ndarray) else {"text": item} for item in input]


def _pixels(image: np.ndarray) -> np.ndarray:
    """Whole-number pixels of any integer dtype as uint8 (Chroma allows int64); floats stay in [0, 1]."""
    if image.dtype.kind in "iu" and image.dtype != np.uint8 and image.size and 0 <= image.min() <= image.max() <= 255:
        return image.astype(np.uint8)
    return image


def _without_none(options: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if value is not None}
