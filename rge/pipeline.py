"""The input pipeline: user inputs -> items the engine can batch, prepared in worker threads.

Two stages, neither on the thread that runs the model:

- ``prepare``: decode each image, resize it to its patch grid, render the prompt, tokenize it, check its
  length. Every check that can refuse an item happens here, before any model work. ``encode`` spreads
  the items over the workers; a server calls ``prepare_pairs`` from a worker of its own.
- ``prefetch``: normalise and patch the resized images of items the engine will admit soon, so that
  building a batch only joins ready tensors (on CUDA they wait in pinned memory and are copied without
  blocking). The engine asks for this a batch ahead of what it runs.

Patches are made only for items about to run: a queued item holds its resized image (at most
``max_pixels`` RGB pixels), not its patches (about eight times larger in float32).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import torch

from .engine.batching import TokenizedItem
from .errors import RGEInputError
from .inputs import make_item, split_inputs
from .prompts import PromptTemplate
from .tokenization import PromptTokenizer
from .types import ImageInput
from .vision import PreparedImage, VisionPreprocessor

CHUNK = 8
"""Items one worker prepares at a time."""


class InputPipeline:
    """Prepares inputs for one checkpoint in a bounded pool of ``workers`` threads (made when first needed)."""

    def __init__(
        self,
        tokenizer: PromptTokenizer,
        vision: VisionPreprocessor,
        template: PromptTemplate,
        *,
        device: torch.device,
        dtype: torch.dtype,
        workers: int | None = None,
    ) -> None:
        self.tokenizer, self.vision, self.template = tokenizer, vision, template
        self.workers = workers or min(4, os.cpu_count() or 1)
        self._convert = _pinned(dtype) if device.type == "cuda" else None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its workers and lock (a worker process, such as sentence-transformers' pool, makes its
        own when first needed)."""
        state = dict(self.__dict__)
        del state["_executor"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._executor, self._lock = None, threading.Lock()

    @property
    def executor(self) -> Executor:
        """The pool of workers (started when first used)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="rge-inputs")
            return self._executor

    def prepare(
        self,
        texts: Any,
        images: Any,
        *,
        reason: bool,
        max_length: int,
        budget: int,
        exif_transpose: bool = True,
        prompt: str = "",
        parallel: bool = True,
    ) -> tuple[list[TokenizedItem], bool]:
        """``encode``'s inputs as items 0..N-1 (and whether the input was single), prepared by the workers
        (``parallel``) or in this thread.

        RGEInputError names the first item (by index) that cannot be used; nothing has reached the model.
        """
        pairs, single = split_inputs(texts, images)
        prepare = functools.partial(self.prepare_pairs, reason=reason, max_length=max_length, budget=budget,
                                    exif_transpose=exif_transpose, prompt=prompt)  # fmt: skip
        if not parallel or (len(pairs) <= CHUNK and all(image is None for _, image in pairs)):
            return prepare(pairs), single
        starts = range(0, len(pairs), CHUNK)
        futures = [self.executor.submit(prepare, pairs[start : start + CHUNK], first=start) for start in starts]
        try:
            return [item for future in futures for item in future.result()], single
        finally:
            for future in futures:
                future.cancel()

    def prepare_pairs(
        self,
        pairs: Sequence[tuple[str, ImageInput | None]],
        *,
        reason: bool,
        max_length: int,
        budget: int,
        exif_transpose: bool = True,
        prompt: str = "",
        first: int = 0,
    ) -> list[TokenizedItem]:
        """``(text, image)`` pairs as items ``first``, ``first + 1``, ... prepared in this thread, one item
        after another (so the error raised is the first bad item's)."""
        render = self.template.query if reason else self.template.candidate
        items = []
        for index, (text, image) in enumerate(pairs, start=first):
            item = make_item(text, image, index, exif_transpose, prompt)
            prepared = None if item.image is None else self.vision.prepare(item.image, index)
            try:
                (tokenized,) = self.tokenizer([render(item.text)], [prepared], max_length, budget if reason else 0)
            except RGEInputError as error:
                raise RGEInputError(error.reason, index, error.part) from None
            items.append(TokenizedItem(index, tokenized.input_ids, prepared))
        return items

    def prefetch(self, items: Sequence[TokenizedItem], on_ready: Callable[[], None] | None = None) -> None:
        """Start making the patches of ``items``' images in the workers (``on_ready`` is called as each is done)."""
        for item in items:
            if isinstance(item.image, PreparedImage):
                item.image.prefetch(self.executor, self._convert, on_ready)

    def close(self) -> None:
        """Stop the workers, dropping queued work (a later call starts new ones)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def _pinned(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """Patches in the model's dtype, in page-locked memory (copied to the GPU without blocking the host); a
    partial, not a closure, so that the pipeline pickles."""
    return functools.partial(_pin, dtype=dtype)


def _pin(patches: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return patches.to(dtype).pin_memory()
