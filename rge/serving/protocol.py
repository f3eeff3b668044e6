"""The OpenAI embeddings protocol as rge serves it: request validation, response bodies, error bodies.

Requests are validated by hand rather than by a schema library so that every error names the field and
the item index the way OpenAI's errors do (``input[3].image: ...``) and token-id input gets an answer
that says what to change.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RGEError
from ..types import ITEM_KEYS
from .settings import ServerSettings

INPUT_TYPES = ("query", "document")
ENCODING_FORMATS = ("float", "base64")
MAX_PROMPT_CHARACTERS = 4096
"""The longest ``prompt`` a request may carry (it is put before every one of its texts)."""
REQUEST_FIELDS = ("model", "input", "encoding_format", "dimensions", "user", "input_type", "return_rationales",
                  "prompt_name", "prompt")  # fmt: skip
"""OpenAI's fields (``user`` is accepted and unused) and rge's; any other field is refused, as ``encode``
refuses unknown keyword arguments, so that a misspelled option never goes unnoticed."""


class APIError(RGEError):
    """An error answered with OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = "input") -> APIError:
    return APIError(400, message, param=param)


@dataclass(frozen=True)
class RequestItem:
    """One input: its text ("" when absent) and its image field as sent (None when absent)."""

    text: str
    image: object | None


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str | None
    items: list[RequestItem]
    encoding_format: str
    input_type: str
    return_rationales: bool
    dimensions: int | None
    prompt_name: str | None = None
    prompt: str | None = None

    @property
    def reason(self) -> bool:
        """Whether the items take the query path."""
        return self.input_type == "query"

    @property
    def has_images(self) -> bool:
        return any(item.image is not None for item in self.items)


def parse_request(payload: object, settings: ServerSettings) -> EmbeddingRequest:
    """A decoded JSON body -> an ``EmbeddingRequest``, or an APIError naming the field and item."""
    if not isinstance(payload, dict):
        raise invalid("the request body must be a JSON object", param=None)
    unknown = sorted(set(payload) - set(REQUEST_FIELDS))
    if unknown:
        raise invalid(f"unknown fields {show(unknown)}; this server takes {', '.join(REQUEST_FIELDS)}",
                      param=unknown[0])  # fmt: skip
    if "input" not in payload:
        raise invalid("'input' is required")
    model = _optional(payload, "model", str)
    encoding_format = _choice(payload, "encoding_format", ENCODING_FORMATS, "float")
    input_type = _input_type(payload, model, settings)
    return_rationales = _optional(payload, "return_rationales", bool) or False
    dimensions = _optional(payload, "dimensions", int)
    _optional(payload, "user", str)
    prompt_name, prompt = _optional(payload, "prompt_name", str), _optional(payload, "prompt", str)
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARACTERS:
        raise invalid(f"'prompt' has {len(prompt)} characters; at most {MAX_PROMPT_CHARACTERS}", param="prompt")
    items = parse_input(payload["input"], settings.max_items_per_request)
    return EmbeddingRequest(model, items, encoding_format, input_type, return_rationales, dimensions, prompt_name,
                            prompt)  # fmt: skip


def _input_type(payload: dict[str, Any], model: str | None, settings: ServerSettings) -> str:
    """``input_type`` as sent; by default "query" for a query model name, else "document"."""
    if model is None or model not in settings.query_model_names:
        return _choice(payload, "input_type", INPUT_TYPES, "document")
    input_type = _choice(payload, "input_type", INPUT_TYPES, "query")
    if input_type != "query":
        documents = show(model.removesuffix(settings.query_model_suffix))
        raise invalid(f"the model {show(model)} embeds queries; send 'input_type' \"query\" or none, or name "
                      f"the model {documents} for documents", param="input_type")  # fmt: skip
    return input_type


def parse_input(value: object, max_items: int) -> list[RequestItem]:
    """``input``: a string, a list of strings, or a list of ``{"text", "image"}`` objects (mixed freely)."""
    if isinstance(value, str):
        return [RequestItem(value, None)]
    if not isinstance(value, list):
        raise invalid(f"'input' must be a string or a list, got {_json_type(value)}")
    if not value:
        raise invalid("'input' is empty")
    if len(value) > max_items:
        raise invalid(f"'input' has {len(value)} items; this server accepts at most {max_items} per request")
    if all(isinstance(entry, int) and not isinstance(entry, bool) for entry in value) or any(
        isinstance(entry, list) for entry in value
    ):
        raise invalid(
            "token-id input is not supported (rge tokenizes for its own model); send text. LangChain's "
            "OpenAIEmbeddings sends token ids unless created with check_embedding_ctx_length=False"
        )
    return [_item(entry, index) for index, entry in enumerate(value)]


def _item(entry: object, index: int) -> RequestItem:
    if isinstance(entry, str):
        return RequestItem(entry, None)
    if not isinstance(entry, dict):
        raise invalid(f"input[{index}] must be a string or an object with 'text' and/or 'image', "
                      f"got {_json_type(entry)}", param=f"input[{index}]")  # fmt: skip
    unknown = set(entry) - set(ITEM_KEYS)
    if unknown:
        allowed = ", ".join(map(repr, ITEM_KEYS))
        raise invalid(f"input[{index}] has unknown keys {show(sorted(unknown))}; allowed: {allowed}",
                      param=f"input[{index}]")  # fmt: skip
    text = entry.get("text", "")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise invalid(f"input[{index}].text must be a string, got {_json_type(text)}", param=f"input[{index}].text")
    image = entry.get("image")
    if image is not None and not isinstance(image, str):
        raise invalid(f"input[{index}].image must be a string (base64 or a data: URI), got {_json_type(image)}",
                      param=f"input[{index}].image")  # fmt: skip
    return RequestItem(text, image)


def _optional(payload: dict[str, Any], key: str, kind: type) -> Any:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise invalid(f"'{key}' must be a {kind.__name__}, got {_json_type(value)}", param=key)
    return value


def _choice(payload: dict[str, Any], key: str, choices: Sequence[str], default: str) -> str:
    value = payload.get(key)
    if value is None:
        return default
    if value not in choices:
        raise invalid(f"'{key}' must be one of {', '.join(map(repr, choices))}, got {show(value)}", param=key)
    return str(value)


def show(value: object, limit: int = 60) -> str:
    """A client's value as JSON, shortened: how messages quote what a client sent."""
    text = json.dumps(value)  # ASCII: no lone surrogate from a client ever reaches an answer's encoder
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def embedding_data(vectors: np.ndarray, encoding_format: str, rationales: Sequence[str] | None) -> list[dict[str, Any]]:
    """The ``data`` list: one ``{"object": "embedding", "index", "embedding"}`` per vector (and its rationale)."""
    data = []
    for index, vector in enumerate(vectors):
        if encoding_format == "base64":
            embedding: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            embedding = vector.tolist()
        entry = {"object": "embedding", "index": index, "embedding": embedding}
        if rationales is not None:
            entry["rationale"] = rationales[index]
        data.append(entry)
    return data
