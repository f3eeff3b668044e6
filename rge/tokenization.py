"""Prompts -> token ids, safely from many threads, refusing a prompt far over the limit without tokenizing it all.

rge tokenizes with a private copy of the checkpoint's Rust tokenizer whose settings never change after
loading: its ``encode``/``decode`` only read it, so worker threads share it without a lock (the
transformers wrapper may switch truncation and padding on its tokenizer, which is what makes sharing
that one unsafe). The ids equal the wrapper's ``tokenizer(prompts, add_special_tokens=False)`` (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .engine.batching import TokenizedItem
from .errors import RGEInputError
from .images import PreparedImage

TAIL_CHARACTERS = 64
"""Characters at the end of a cut prompt whose words may tokenize differently once the text goes on (a
word cut in two, an added token cut in two, Unicode normalisation across the cut); longer than any added
token."""


class PromptTokenizer:
    """Token ids of prompts, each ``<|image_pad|>`` expanded to its image's visual tokens."""

    def __init__(self, tokenizer: Any, image_pad_id: int) -> None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self.image_pad_id = image_pad_id
        self._longest_token = max(len(token) for token in backend.get_vocab())
        """The most characters one token covers (byte-level vocabularies spell one byte per character)."""

    def __call__(
        self, prompts: Sequence[str], images: Sequence[PreparedImage | None], max_length: int, budget: int = 0
    ) -> list[TokenizedItem]:
        """Items 0..N-1; RGEInputError naming the item whose prompt (plus ``budget`` generated tokens) is over
        ``max_length``. A prompt far over it is refused after tokenizing a part of it only."""
        for index, prompt in enumerate(prompts):
            at_least = self.lower_bound(prompt, max_length - budget)
            if at_least is not None:
                raise RGEInputError(_too_long(f"at least {at_least}", budget, max_length), index)
        encoded = self._backend.encode_batch_fast(list(prompts), add_special_tokens=False)
        items = []
        for index, (encoding, image) in enumerate(zip(encoded, images)):
            ids = self._expand(encoding.ids, image)
            if len(ids) + budget > max_length:
                raise RGEInputError(_too_long(str(len(ids)), budget, max_length), index)
            items.append(TokenizedItem(index, ids, image))
        return items

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens included (as generated)."""
        return str(self._backend.decode(list(ids), skip_special_tokens=False))

    def lower_bound(self, prompt: str, limit: int) -> int | None:
        """A count of tokens ``prompt`` has at least, when that count is over ``limit``; None otherwise.

        Two bounds, each cheap: characters over the longest token; and the tokens of a cut prompt that
        lie before its last words (words are split by a regular expression that looks one character
        ahead, and each is tokenized on its own, so those tokens are the full prompt's too). The cut
        grows until the bound passes ``limit`` or reaches the whole prompt, so at most about twice the
        text that fits is tokenized.
        """
        if len(prompt) <= 2 * (limit + TAIL_CHARACTERS):
            return None  # short enough to tokenize whole
        by_length = -(-len(prompt) // self._longest_token)
        if by_length > limit:
            return by_length
        cut = 2 * (limit + TAIL_CHARACTERS)
        while cut < len(prompt):
            bound = self._tokens_before_tail(prompt[:cut])
            if bound > limit:
                return bound
            cut = max(2 * cut, int(cut * 1.25 * (limit + 1) / max(bound, 1)))
        return None

    def _tokens_before_tail(self, part: str) -> int:
        encoding = self._backend.encode(part, add_special_tokens=False)
        start = len(part) - TAIL_CHARACTERS
        word = encoding.char_to_word(start)
        span = None if word is None else encoding.word_to_chars(word)
        start = start if span is None else span[0]
        for position in range(start, len(part)):
            token = encoding.char_to_token(position)
            if token is not None:
                return int(token)
        return 0

    def _expand(self, ids: list[int], image: PreparedImage | None) -> list[int]:
        if image is None:
            return ids
        slot = ids.index(self.image_pad_id)
        return ids[:slot] + [self.image_pad_id] * image.tokens + ids[slot + 1 :]


def _too_long(tokens: str, budget: int, max_length: int) -> str:
    plus = f" plus {budget} reasoning tokens" if budget else ""
    return (
        f"prompt of {tokens} tokens{plus} exceeds max_length={max_length}; shorten the text or lower the "
        "image's max_pixels"
    )
