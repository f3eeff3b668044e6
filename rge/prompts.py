"""The RGE prompt: the Qwen2.5-VL chat template around one user text, image placement and ``<emb>``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EMB_TOKEN = "<emb>"
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
MMEB_IMAGE_MARKER = "<|image_1|>"

_SENTINEL = "\x00rge-user-text\x00"


def place_image(text: str, has_image: bool) -> str:
    """Put the vision block where the image belongs in ``text``.

    An MMEB marker ``<|image_1|>`` becomes the vision block; a text that already holds the vision block
    keeps it; otherwise the image goes before the text, as in training. Without an image, markers and
    vision blocks are removed (the MMEB protocol).
    """
    text = text.replace(MMEB_IMAGE_MARKER, VISION_BLOCK)
    if not has_image:
        return text.replace(VISION_BLOCK, "")
    if VISION_BLOCK in text:
        return text
    return VISION_BLOCK + text


def count_image_slots(text: str) -> int:
    """How many images ``text`` asks for (MMEB markers plus vision blocks)."""
    return text.count(MMEB_IMAGE_MARKER) + text.count(VISION_BLOCK)


@dataclass(frozen=True)
class PromptTemplate:
    """The chat template rendered once around a sentinel, so each prompt is ``prefix + text + suffix``.

    Rendering the template per item gives the same string; splitting it once avoids a Jinja render
    per input.
    """

    prefix: str
    suffix: str

    @classmethod
    def from_chat_template(cls, tokenizer: Any, chat_template: str) -> PromptTemplate:
        messages = [{"role": "user", "content": [{"type": "text", "text": _SENTINEL}]}]
        rendered = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
        if rendered.count(_SENTINEL) != 1:
            raise ValueError("the chat template does not place the user text exactly once")
        prefix, suffix = rendered.split(_SENTINEL)
        return cls(prefix=prefix, suffix=suffix)

    def query(self, text: str) -> str:
        """The prompt that reasons: it ends with the assistant turn's opening."""
        return self.prefix + text + self.suffix

    def candidate(self, text: str) -> str:
        """The prompt embedded in one forward pass: the query prompt followed by ``<emb>``."""
        return self.prefix + text + self.suffix + EMB_TOKEN
