"""Prompts -> token ids, safely from many threads, refusing a prompt far over the limit without tokenizing it all.

rge tokenizes with a private copy of the checkpoint's Rust tokenizer whose settings never change after
loading: its ``encode``/``decode`` only read it, so worker threads share it without a lock (the
transformers wrapper may switch truncation and padding on its tokenizer, which is what makes sharing
that one unsafe). The ids equal the wrapper's ``tokenizer(prompts, add_special_tokens=False)`` (tested).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

from .engine.batching import TokenizedItem
from .errors import RGEInputError
from .vision import PreparedImage

TAIL_CHARACTERS = 64
"""Characters at the end of a cut prompt whose words may tokenize differently once the text goes on (a
word cut in two, an added token cut in two); longer than any added token. The tail also takes any run of
whitespace or combining marks that reaches it, and the word before that run (see ``_tail_start``)."""


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
        self._nfc_or_none = backend.normalizer is None or type(backend.normalizer).__name__ == "NFC"
        """Whether the text the tokenizer splits is the text as given, or its NFC (Qwen2's tokenizer)."""

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

        Two bounds, each cheap: the text's UTF-8 bytes over the longest token's (when the text is already
        in NFC, which normalisation leaves as it is; typical text is, and ASCII always); and the tokens
        of a cut prompt that lie before its tail (``_tail_start``): the words before it are split and
        tokenized as in the whole prompt, each on its own, so their tokens are the whole prompt's too.
        The cut grows until the bound passes ``limit`` or reaches the whole prompt, so at most about twice
        the text that fits is tokenized (a text with no word boundaries, one run of letters, is tokenized
        whole: no cut of it is certain).
        """
        if len(prompt) <= 2 * (limit + TAIL_CHARACTERS):
            return None  # short enough to tokenize whole
        by_length = -(-_normalized_bytes(prompt) // self._longest_token) if self._nfc_or_none else 0
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
        start = _tail_start(part)
        word = encoding.char_to_word(start) if start < len(part) else None
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


def _normalized_bytes(text: str) -> int:
    """The UTF-8 bytes of ``text`` as the tokenizer's NFC leaves it, when that costs nothing to know (0 when
    the text would change: normalising all of it would hold the interpreter lock too long)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8")) if unicodedata.is_normalized("NFC", text) else 0


def _tail_start(part: str) -> int:
    """Where the tail of a cut prompt starts: ``TAIL_CHARACTERS`` from its end, moved back over any run of
    whitespace or combining marks that reaches there, and one character more (its word is the tail's).

    Words before it end the same way in the whole prompt: a word's end depends on what follows it only
    through whitespace (the split expression's ``\\s*[\\r\\n]+`` looks across a whole run of it) and
    through combining marks (Unicode normalisation reorders and composes across a run of them).
    """
    start = max(0, len(part) - TAIL_CHARACTERS)
    while start > 0 and (part[start - 1].isspace() or unicodedata.category(part[start - 1]).startswith("M")):
        start -= 1
    return max(0, start - 1)


def _too_long(tokens: str, budget: int, max_length: int) -> str:
    plus = f" plus {budget} reasoning tokens" if budget else ""
    return (
        f"prompt of {tokens} tokens{plus} exceeds max_length={max_length}; shorten the text or lower the "
        "image's max_pixels"
    )
