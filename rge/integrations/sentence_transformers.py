"""sentence-transformers: a ``SentenceTransformer`` whose ``encode_query`` reasons and ``encode_document`` does not.

>>> from rge.integrations.sentence_transformers import to_sentence_transformer
>>> model = to_sentence_transformer(encoder)                  # doctest: +SKIP
>>> model.similarity(model.encode_query(["What is in the image?"]), model.encode_document(["A cat."]))  # doctest: +SKIP

The model is one custom input module, ``RGEInputModule``, that hands each batch to the encoder: the
``task`` sentence-transformers passes (``"query"`` from ``encode_query``, ``"document"`` from
``encode_document``) picks the path. Inputs: text, PIL images, and ``{"text": ..., "image": ...}`` dicts.
Embeddings come back L2-normalised, so dot product and cosine agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import require
from ._shared import model_label, resolve_encoder

require("sentence_transformers", "sentence-transformers")

from PIL import Image  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.base.modules.input_module import InputModule  # noqa: E402

from ..encoder import RGEEncoder  # noqa: E402


class RGEInputModule(InputModule):  # type: ignore[misc]
    """The whole RGE model as a sentence-transformers input module (preprocess + forward)."""

    config_keys = ["model_name_or_path", "max_new_tokens"]
    forward_kwargs = {"task"}

    def __init__(
        self, encoder: RGEEncoder | None = None, model_name_or_path: str | None = None, **load_kwargs: Any
    ) -> None:
        super().__init__()
        self.encoder = resolve_encoder(encoder, model_name_or_path, load_kwargs)
        self.model_name_or_path = model_label(self.encoder, model_name_or_path)
        self.max_new_tokens = self.encoder.max_new_tokens
        self.rge_model = self.encoder.model  # a submodule, so the SentenceTransformer moves it with .to()

    @property
    def modalities(self) -> list[Any]:
        # "message" lets one batch mix text, images and text+image items.
        return ["text", "image", ("image", "text"), "message"]

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Nothing to tokenize here: the encoder prepares each batch itself."""
        return {"rge_items": [_item(value, prompt) for value in inputs]}

    def forward(self, features: dict[str, Any], task: str | None = None, **kwargs: Any) -> dict[str, Any]:
        items = features["rge_items"]
        vectors = self.encoder.encode(
            items,
            reason=task == "query",
            batch_size=max(1, len(items)),
            convert_to_tensor=True,
            show_progress_bar=False,
        )
        features["sentence_embedding"] = vectors.to(self.encoder.device)
        return features

    def get_embedding_dimension(self) -> int:
        return self.encoder.embedding_dim

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Save a reference to the RGE checkpoint (the weights stay where they are)."""
        self.save_config(output_path)

    @classmethod
    def load(  # type: ignore[override]
        cls, model_name_or_path: str, **kwargs: Any
    ) -> RGEInputModule:
        config = cls.load_config(model_name_or_path=model_name_or_path, **_hub_kwargs(kwargs))
        return cls(model_name_or_path=config["model_name_or_path"], max_new_tokens=config["max_new_tokens"])


def to_sentence_transformer(encoder: RGEEncoder, **kwargs: Any) -> SentenceTransformer:
    """Wrap ``encoder`` in a ``SentenceTransformer`` (cosine similarity); ``kwargs`` go to its constructor."""
    kwargs.setdefault("similarity_fn_name", "cosine")
    kwargs.setdefault("device", str(encoder.device))
    return SentenceTransformer(modules=[RGEInputModule(encoder)], **kwargs)


def _item(value: Any, prompt: str | None) -> dict[str, Any]:
    if isinstance(value, str):
        item: dict[str, Any] = {"text": value}
    elif isinstance(value, Image.Image):
        item = {"image": value}
    elif _is_message(value) or (isinstance(value, list) and value and all(_is_message(m) for m in value)):
        item = _from_messages(value if isinstance(value, list) else [value])
    elif isinstance(value, dict):
        item = dict(value)
    else:
        raise TypeError(f"RGE takes text, PIL images or {{'text', 'image'}} dicts, got {type(value).__name__}")
    if prompt:
        item["text"] = prompt + item.get("text", "")
    return item


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and "role" in value and "content" in value


def _from_messages(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The text parts of chat messages, joined, and their one image (RGE embeds one image per item)."""
    texts, images = [], []
    for message in messages:
        content = message["content"]
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part.get("type") == "image" or "image" in part:
                images.append(part.get("image"))
            elif "text" in part:
                texts.append(part["text"])
    if len(images) > 1:
        raise ValueError(f"RGE embeds one image per item, got {len(images)} in one conversation")
    return {"text": "".join(texts), **({"image": images[0]} if images else {})}


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("subfolder", "token", "cache_folder", "revision", "local_files_only")
    return {key: kwargs[key] for key in keys if key in kwargs}


__all__ = ["RGEInputModule", "to_sentence_transformer"]
