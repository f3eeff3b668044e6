"""The tiny tokenizer and the Qwen2.5-VL chat template that tiny checkpoints carry."""

from __future__ import annotations

import json
from typing import Any

QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The default Qwen2.5-VL chat template, the one RGE's prompts are rendered with."""

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
EMB = "<emb>"

TRAINING_TEXT = [
    "Answer the question based on the given image: What is in the image?",
    "Represent the given image with the following question: What is the color of the car?",
    "Find a caption for the news in the given photo. Retrieve an image of this news caption.",
    "Summarize the following answer in one word: A cat and a dog. A cat and a tiger.",
    "Select the portion of the image that isolates the object labeled as a red umbrella.",
    "Identify the scene shown in the image. The photo shows a kitchen, a beach, a forest and a city.",
    "Reasoning guided embeddings generate a short rationale before they embed the query.",
    "0123456789 , . ; : ? ! ' \" ( ) [ ] - _ / \\ @ # % & * + = < > | ~ ` ^ $",
]


def build_tiny_tokenizer(*, with_emb_token: bool = True) -> Any:
    """A byte-level BPE (a few hundred tokens) with Qwen2.5-VL's special tokens and ``<emb>`` after them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=448, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(TRAINING_TEXT * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    specials = SPECIAL_TOKENS + ([EMB] if with_emb_token else [])
    settings: dict[str, Any] = {
        "unk_token": None,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "extra_special_tokens": specials,
        "merges": merges,  # pairs, as the trained BPE gives them
    }
    return Qwen2Tokenizer(vocab=model["vocab"], **settings)


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of Qwen2.5-VL's special tokens in ``tokenizer``."""
    return {token: int(tokenizer.convert_tokens_to_ids(token)) for token in SPECIAL_TOKENS}
