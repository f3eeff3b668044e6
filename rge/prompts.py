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
    text = marker_to_vision(text, has_image)
    if not has_image or VISION_BLOCK in text:
        return text
    return VISION_BLOCK + text


def marker_to_vision(text: str, has_image: bool) -> str:
    """``text`` with each MMEB marker ``<|image_1|>`` as the vision block; without an image, markers and
    vision blocks removed."""
    text = text.replace(MMEB_IMAGE_MARKER, VISION_BLOCK)
    return text if has_image else text.replace(VISION_BLOCK, "")


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


TASK_PROMPTS: dict[str, str] = {
    # text -> everyday image (MSCOCO_t2i); documents are images
    "image_retrieval_query": "Describe and represent the following descriptive caption for everyday image retrieval: ",
    "image_retrieval_document": "Summarize the given image in one word.",
    # image -> caption (MSCOCO_i2t); documents are texts
    "caption_retrieval_query": (
        "Describe and represent the above everyday image for a corresponding description retrieval"
    ),
    "caption_retrieval_document": "Summarize the following sentence in one word: ",
    # question -> document page image (Wiki-SS-NQ)
    "document_retrieval_query": "Describe and represent the following query for a document image retrieval: ",
    "document_retrieval_document": "Summarize the given image in one word.",
    # image + question -> short answer (OK-VQA, A-OKVQA, GQA, ...)
    "vqa_query": "Answer the question based on the given image: ",
    "vqa_document": "Summarize the following answer in one word: ",
    # image -> class label (ImageNet-1K, VOC2007, ObjectNet, ...)
    "classification_query": "Identify the category of the main object in the given image for classification",
    "classification_document": "Summarize the following object category in one word: ",
    # image + referring expression -> cropped object image (RefCOCO)
    "grounding_query": (
        "Describe and focus on the object in the image that follows the following language expressions: "
    ),
    "grounding_document": "Summarize the given cropped image of the object in one word.",
}
"""Instructions RGE was trained and evaluated with (the authors' MMEB rewrites), by task and side.

Each is put before the item's text (an image goes first). ``prompt_name="vqa"`` picks ``"vqa_query"`` on
the query path and ``"vqa_document"`` on the candidate path.
"""


def resolve_prompt(prompt: str | None, prompt_name: str | None, reason: bool) -> str:
    """The prefix for this call: ``prompt`` as given, or the named task prompt for this side ("" for none)."""
    if prompt is not None and prompt_name is not None:
        raise ValueError("give prompt or prompt_name, not both")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        if EMB_TOKEN in prompt:
            raise ValueError(f"prompt contains the reserved token {EMB_TOKEN}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"prompt is not valid Unicode ({exc.reason} at position {exc.start})") from None
        return prompt
    if prompt_name is None:
        return ""
    side = f"{prompt_name}_{'query' if reason else 'document'}"
    for name in (prompt_name, side):
        if name in TASK_PROMPTS:
            return TASK_PROMPTS[name]
    tasks = sorted({name.rsplit("_", 1)[0] for name in TASK_PROMPTS})
    raise ValueError(
        f'unknown prompt_name "{prompt_name}"; tasks: {", ".join(tasks)} (or a full name like "vqa_query")'
    )
