"""Requests -> items the engine can run, in worker threads grouped by the kind of work ("lanes").

Nothing here runs on the event loop or the engine thread:

- the **text lane** (two threads) checks and parses every body, prepares requests without images
  (tokenizing only) and builds answers;
- the **image lane** (``input_workers`` threads) prepares requests with images: each image is decoded
  within the per-image and per-request pixel limits and resized at once (a request's full-size images are
  never all held together), then prompts are tokenized. One request takes one thread at a time, so a
  request of large images never holds more than one, and never delays a request without images;
- the **fetch lane** (``max_concurrent_fetches`` threads) fetches image URLs, which wait on the network.

Every refusal is an ``APIError`` whose ``param`` names the item and part (``input[3]``, ``input[3].image``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..engine.batching import TokenizedItem
from ..errors import RGEInputError
from ..prompts import resolve_prompt
from .bodies import check_shape, parse_json
from .protocol import APIError, EmbeddingRequest, invalid, parse_request
from .request_images import ImageRejected, PixelBudget, image_bytes, is_url, open_image
from .scheduler import ServedEncoder
from .settings import ServerSettings

T = TypeVar("T")


class RequestPreparer:
    """Parses and prepares requests for one encoder in three bounded pools of threads."""

    def __init__(self, encoder: ServedEncoder, settings: ServerSettings) -> None:
        self.encoder, self.settings = encoder, settings
        self.text_lane = ThreadPoolExecutor(2, "rge-text")
        self.image_lane = ThreadPoolExecutor(settings.input_workers, "rge-images")
        self.fetch_lane = ThreadPoolExecutor(settings.max_concurrent_fetches, "rge-fetch")

    async def parse(self, body: bytes) -> EmbeddingRequest:
        """A body -> a validated request (shape first, then JSON, then fields), in the text lane."""
        return await self.in_lane(self.text_lane, self._parse, body)

    async def prepare(self, request: EmbeddingRequest, abandoned: threading.Event) -> list[TokenizedItem]:
        """The request's items, indexed 0..N-1, ready for the engine (images resized, prompts tokenized).

        Once ``abandoned`` is set (the request timed out), its worker stops between two items.
        """
        prompt = self._prompt(request)
        if not request.has_images:
            return await self.in_lane(self.text_lane, self._prepare_texts, request, prompt)
        fetched = await self._fetch_urls(request)
        return await self.in_lane(self.image_lane, self._prepare_with_images, request, prompt, fetched, abandoned)

    async def in_lane(self, lane: ThreadPoolExecutor, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` run in ``lane``, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(lane, work, *args)

    def close(self) -> None:
        """Stop the lanes (work queued in them is dropped) and the encoder's input workers."""
        for lane in (self.text_lane, self.image_lane, self.fetch_lane):
            lane.shutdown(wait=False, cancel_futures=True)
        self.encoder.inputs.close()

    def _parse(self, body: bytes) -> EmbeddingRequest:
        check_shape(body, max_values=4 * self.settings.max_items_per_request + 64)
        return parse_request(parse_json(body), self.settings)

    def _prompt(self, request: EmbeddingRequest) -> str:
        if request.prompt is None and request.prompt_name is None:
            return self.settings.default_prompt(request.reason)
        try:
            return resolve_prompt(request.prompt, request.prompt_name, request.reason)
        except ValueError as error:
            raise invalid(str(error), param="prompt_name" if request.prompt_name is not None else "prompt") from None

    def _prepare_texts(self, request: EmbeddingRequest, prompt: str) -> list[TokenizedItem]:
        texts = [item.text for item in request.items]
        try:
            return self.encoder.prepare(texts, reason=request.reason, prompt=prompt)  # type: ignore[no-any-return]
        except RGEInputError as error:
            raise _item_error(error, error.index) from None

    async def _fetch_urls(self, request: EmbeddingRequest) -> dict[int, bytes]:
        """The bodies of the request's image URLs, fetched at once; together they may hold no more bytes
        than a body may (as if the images had been sent inline)."""
        urls = {index: item.image for index, item in enumerate(request.items)
                if isinstance(item.image, str) and is_url(item.image)}  # fmt: skip
        fetches = {asyncio.ensure_future(self.in_lane(self.fetch_lane, _fetch, index, url, self.settings)): index
                   for index, url in urls.items()}  # fmt: skip
        fetched: dict[int, bytes] = {}
        try:
            for done in asyncio.as_completed(fetches):
                index, data = await done
                fetched[index] = data
                if sum(map(len, fetched.values())) > self.settings.max_body_bytes:
                    limit = self.settings.max_body_bytes
                    raise invalid(f"input[{index}].image: the request's image URLs hold more than {limit} bytes "
                                  "together", param=f"input[{index}].image")  # fmt: skip
        finally:
            for fetch in fetches:
                fetch.cancel()  # the ones not yet started
        return fetched

    def _prepare_with_images(
        self, request: EmbeddingRequest, prompt: str, fetched: dict[int, bytes], abandoned: threading.Event
    ) -> list[TokenizedItem]:
        budget = PixelBudget(self.settings.max_request_pixels)
        items = []
        for index, item in enumerate(request.items):
            if abandoned.is_set():
                return []
            entry: dict[str, Any] = {"text": item.text}
            if item.image is not None:
                entry["image"] = _decode(index, item.image, fetched.pop(index, None), self.settings, budget)
            try:
                (prepared,) = self.encoder.prepare([entry], reason=request.reason, prompt=prompt)
            except RGEInputError as error:
                raise _item_error(error, index) from None
            items.append(dataclasses.replace(prepared, index=index))
        return items


def _fetch(index: int, url: str, settings: ServerSettings) -> tuple[int, bytes]:
    try:
        return index, image_bytes(url, settings)
    except ImageRejected as error:
        raise _image_error(index, error) from None


def _decode(index: int, image: object, data: bytes | None, settings: ServerSettings, budget: PixelBudget) -> Any:
    try:
        return open_image(image_bytes(str(image), settings) if data is None else data, settings.max_image_pixels,
                          budget)  # fmt: skip
    except ImageRejected as error:
        raise _image_error(index, error) from None


def _image_error(index: int, error: ImageRejected) -> APIError:
    return invalid(f"input[{index}].image: {error}", param=f"input[{index}].image")


def _item_error(error: RGEInputError, index: int | None) -> APIError:
    if index is None:
        return invalid(error.reason)
    param = f"input[{index}]" + (f".{error.part}" if error.part else "")
    return invalid(f"{param}: {error.reason}", param=param)
