"""sentence-transformers: a ``SentenceTransformer`` whose ``encode_query`` reasons and ``encode_document`` does not.

>>> from rge.integrations.sentence_transformers import to_sentence_transformer
>>> model = to_sentence_transformer(encoder)                  # doctest: +SKIP
>>> model.similarity(model.encode_query(["What is in the image?"]), model.encode_document(["A cat."]))  # doctest: +SKIP

The model is one custom input module, ``RGEInputModule``, that hands each batch to the encoder: the
``task`` sentence-transformers passes (``"query"`` from ``encode_query``, ``"document"`` from
``encode_document``, or ``encode(..., task="query")``) picks the path; without one, the prompt named
``"query"`` does (``encode(..., prompt_name="query")``, or ``default_prompt_name="query"``), so libraries
that only call ``encode`` can embed queries. Inputs: text, images (PIL, arrays, tensors; a str that is an
``http(s)`` URL or an existing image file's path is that image), ``{"text": ..., "image": ...}`` dicts and
chat messages.
Embeddings come back L2-normalised, so dot product and cosine agree.
Task prompts are named as for the encoder: ``prompt_name="vqa"`` is ``"vqa_query"`` in ``encode_query`` and
``"vqa_document"`` in ``encode_document``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import require_extra
from ._shared import model_label, resolve_encoder

require_extra("sentence_transformers", extra="sentence-transformers", needed_by=__name__)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.base.modules.input_module import InputModule  # noqa: E402

from ..encoder import RGEEncoder  # noqa: E402
from ..prompts import TASK_PROMPTS, resolve_prompt  # noqa: E402

TASK_MARKER = "rge-task:"
"""``prompts[task]`` for a bare task name (``"vqa"``) is this marker and the name: sentence-transformers looks
a ``prompt_name`` up before it knows the side, so the module picks the side's prompt when the task arrives."""

SIDE_MARKER = "rge-side:"
"""``prompts["query"]`` and ``prompts["document"]`` are this marker and the side: a call without a ``task`` takes
the side its prompt names (no instruction is added)."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


class RGEInputModule(InputModule):  # type: ignore[misc]
    """The whole RGE model as a sentence-transformers input module (preprocess + forward).

    ``save`` records a reference to the checkpoint (hub id and revision, or a local directory) with every
    setting that changes a vector, so that ``SentenceTransformer(path, trust_remote_code=True)`` gives back
    the same vectors.
    """

    config_keys = ["model_name_or_path", "revision", "max_new_tokens", "min_pixels", "max_pixels", "max_length",
                   "dtype", "repetition_penalty"]  # fmt: skip

    def __init__(
        self, encoder: RGEEncoder | None = None, model_name_or_path: str | None = None, **load_kwargs: Any
    ) -> None:
        super().__init__()
        self.encoder = resolve_encoder(encoder, model_name_or_path, load_kwargs)
        checkpoint = self.encoder.checkpoint
        self.model_name_or_path = checkpoint.name or model_label(self.encoder, model_name_or_path)
        self.revision = checkpoint.revision
        self.max_new_tokens = self.encoder.max_new_tokens
        self.min_pixels, self.max_pixels = checkpoint.vision.min_pixels, checkpoint.vision.max_pixels
        self.max_length = self.encoder.max_length
        self.dtype = str(self.encoder.dtype).removeprefix("torch.")
        self.repetition_penalty = self.encoder.generation_settings.repetition_penalty
        self.rge_model = self.encoder.model  # a submodule, so the SentenceTransformer moves it with .to()

    @property
    def modalities(self) -> list[Any]:
        # "message" lets one batch mix text, images and text+image items.
        return ["text", "image", ("image", "text"), "message"]

    def preprocess(
        self, inputs: Sequence[Any], prompt: str | None = None, task: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Nothing to tokenize here: the encoder prepares each batch itself. The side is the ``task`` given, else
        the one a side prompt names (``prompt_name="query"``), else documents."""
        side = prompt.removeprefix(SIDE_MARKER) if prompt and prompt.startswith(SIDE_MARKER) else None
        reason = task == "query" if task is not None else side == "query"
        if side is not None:
            prompt = None
        elif prompt and prompt.startswith(TASK_MARKER):
            prompt = resolve_prompt(None, prompt.removeprefix(TASK_MARKER), reason=reason)
        return {"rge_items": [_item(value, prompt) for value in inputs], "rge_reason": reason}

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """The raw ``<emb>`` states: sentence-transformers normalises them when asked
        (``normalize_embeddings=True``), and cosine similarity does not need it."""
        items = features["rge_items"]
        vectors = self.encoder.encode(
            items,
            reason=features["rge_reason"],
            batch_size=max(1, len(items)),
            normalize=False,
            convert_to_tensor=True,
            show_progress_bar=False,
        )
        features["sentence_embedding"] = vectors.to(self.encoder.device)
        features["token_embeddings"] = _NoTokenEmbeddings()  # with a mask, as sentence-transformers reads them
        features["attention_mask"] = torch.ones((len(items), 1), dtype=torch.long)
        return features

    def get_embedding_dimension(self) -> int:
        return self.encoder.embedding_dim

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Save a reference to the RGE checkpoint and the settings (the weights stay where they are)."""
        self.save_config(output_path)

    @classmethod
    def load(  # type: ignore[override]
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> RGEInputModule:
        """The module ``save`` wrote; ``model_kwargs`` override its settings (e.g. ``{"device": "cpu"}``)."""
        config = cls.load_config(
            model_name_or_path=model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
            revision=revision, local_files_only=local_files_only,
        )  # fmt: skip
        settings = {key: config[key] for key in cls.config_keys[2:] if config.get(key) is not None}
        options = {**settings, "revision": config.get("revision"), "token": token, "cache_dir": cache_folder,
                   "local_files_only": local_files_only, **(model_kwargs or {})}  # fmt: skip
        return cls(model_name_or_path=config["model_name_or_path"], **options)


class _NoTokenEmbeddings:
    """Stands where sentence-transformers looks for token embeddings, to say why there are none."""

    def __iter__(self) -> Any:
        raise ValueError(
            "RGE gives one embedding per input (the hidden state of <emb>); output_value='token_embeddings' "
            "is not available, use the default output_value='sentence_embedding'"
        )


def to_sentence_transformer(encoder: RGEEncoder, **kwargs: Any) -> SentenceTransformer:
    """Wrap ``encoder`` in a ``SentenceTransformer`` (cosine similarity); ``kwargs`` go to its constructor.

    Its ``prompts`` are rge's task prompts and the two sides, unless given: by task
    (``encode_query(..., prompt_name="vqa")``, the side's prompt), by full name (``"vqa_query"``), or a side
    (``encode(..., prompt_name="query")`` reasons). ``default_prompt_name="query"`` makes a plain ``encode``
    reason, and is saved with the model.
    """
    kwargs.setdefault("similarity_fn_name", "cosine")
    kwargs.setdefault("prompts", task_prompts())
    kwargs.setdefault("device", str(encoder.device))
    return SentenceTransformer(modules=[RGEInputModule(encoder)], **kwargs)


def task_prompts() -> dict[str, str]:
    """rge's task prompts by full name (``"vqa_query"``), by task (``"vqa"``: the side's, chosen per call), and the
    sides (``"query"``, ``"document"``: the path alone)."""
    tasks = sorted({name.rsplit("_", 1)[0] for name in TASK_PROMPTS})
    sides = {side: SIDE_MARKER + side for side in ("query", "document")}
    return {**TASK_PROMPTS, **{task: TASK_MARKER + task for task in tasks}, **sides}


def _item(value: Any, prompt: str | None) -> dict[str, Any]:
    if isinstance(value, str) and _names_an_image(value):
        item: dict[str, Any] = {"image": value}
    elif isinstance(value, str):
        item = {"text": value}
    elif isinstance(value, (Image.Image, np.ndarray, torch.Tensor)):
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


def _names_an_image(value: str) -> bool:
    """sentence-transformers' convention for image-capable models: a str that is an ``http(s)`` URL or the path
    of an existing image file is that image, never its name embedded as text."""
    if value.startswith(("http://", "https://")):
        return True
    path = Path(value)
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


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


__all__ = ["RGEInputModule", "to_sentence_transformer"]
