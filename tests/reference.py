"""The reference algorithm, written independently of rge's batching: one item at a time.

Inputs are built the way the Qwen2.5-VL processor builds them (chat template, ``<|image_pad|>``
repeated in the string, then tokenised). Queries run the authors' ``generate`` call (``<emb>`` as the only
stop token, no decoding argument: the checkpoint's generation config decides) and their extra forward
pass that feeds the last generated token; candidates run one full-model forward and read the last layer
at the first ``<emb>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class Reference:
    model: object
    tokenizer: object
    image_processor: object
    chat_template: str
    min_pixels: int
    max_pixels: int

    @classmethod
    def load(cls, path: Path, min_pixels: int, max_pixels: int) -> Reference:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from rge.testing import QWEN25_VL_CHAT_TEMPLATE

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
        return cls(
            model,
            AutoTokenizer.from_pretrained(str(path)),
            Qwen2VLImageProcessorPil.from_pretrained(str(path)),
            QWEN25_VL_CHAT_TEMPLATE,
            min_pixels,
            max_pixels,
        )

    @property
    def emb_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<emb>")

    def inputs(self, text: str, image: Image.Image | None, candidate: bool) -> dict:
        if image is not None:
            text = text.replace("<|image_1|>", VISION_BLOCK)
            if VISION_BLOCK not in text:
                text = VISION_BLOCK + text
            if image.width < 28:
                image = image.resize((28, image.height))
            if image.height < 28:
                image = image.resize((image.width, 28))
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        prompt = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        if candidate:
            prompt += "<emb>"
        extra = {}
        if image is not None:
            processed = self.image_processor(
                images=[image],
                size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
                return_tensors="pt",
            )
            count = int(processed["image_grid_thw"][0].prod()) // 4
            prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * count)
            extra = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
        encoded = self.tokenizer(prompt, return_tensors="pt")
        image_pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        inputs = {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "mm_token_type_ids": (encoded["input_ids"] == image_pad).int(),
            **extra,
        }
        device = next(self.model.parameters()).device  # type: ignore[attr-defined]
        return {name: tensor.to(device) for name, tensor in inputs.items()}

    @torch.no_grad()
    def candidate(self, text: str, image: Image.Image | None = None) -> torch.Tensor:
        inputs = self.inputs(text, image, candidate=True)
        out = self.model(**inputs, output_hidden_states=True)
        position = int((inputs["input_ids"][0] == self.emb_id).int().argmax())
        return out.hidden_states[-1][0, position]

    @torch.no_grad()
    def query(
        self, text: str, image: Image.Image | None = None, max_new_tokens: int = 32, **generate_kwargs: object
    ) -> tuple[torch.Tensor, list[int]]:
        inputs = self.inputs(text, image, candidate=False)
        generated = self.model.generate(
            **inputs,
            return_dict_in_generate=True,
            output_hidden_states=True,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.emb_id,
            use_cache=True,
            **generate_kwargs,
        )
        tokens = generated.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        past_seen = generated.past_key_values.get_seq_length()
        out = self.model(
            input_ids=generated.sequences[:, -1:],
            past_key_values=generated.past_key_values,
            cache_position=torch.arange(past_seen, past_seen + 1),
            output_hidden_states=True,
            use_cache=True,
        )
        return out.hidden_states[-1][0, -1], tokens
