"""The authors' inference (MCG-NJU/RGE inference.py), run under their pinned transformers 4.51.3.

Run by tests/test_cross_version.py with the python of a separate virtual environment; it must not
import rge. Reads a job (JSON) naming the checkpoint and the items, writes per item the generated token
ids (queries) and the embedding. Differences from inference.py: fp32 on the CPU with sdpa (no
flash-attention here), and the pixel budget given to AutoProcessor as eval_ar.py gives it.
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration


def construct_prompt(text):
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


@torch.no_grad()
def encode_and_generate(model, processor, inputs, max_new_tokens):
    generation_output = model.generate(
        **inputs,
        return_dict_in_generate=True,
        output_hidden_states=True,
        max_new_tokens=max_new_tokens,
        eos_token_id=processor.tokenizer.convert_tokens_to_ids("<emb>"),
        use_cache=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    generated_ids = generation_output.sequences[0][prompt_len:]
    past_seen = generation_output.past_key_values.get_seq_length()
    new_inputs = {
        "input_ids": generation_output.sequences[:, -1:],
        "past_key_values": generation_output.past_key_values,
        "cache_position": torch.arange(past_seen, past_seen + 1, device=generation_output.sequences.device),
    }
    outputs = model(**new_inputs, output_hidden_states=True, use_cache=True)
    return outputs.hidden_states[-1][:, -1, :], generated_ids.tolist()


@torch.no_grad()
def ar_encode(model, processor, inputs):
    emb_id = processor.tokenizer.convert_tokens_to_ids("<emb>")
    outputs = model(**inputs, output_hidden_states=True)
    embed_indices = torch.argmax((inputs["input_ids"] == emb_id).int(), dim=1)
    return outputs.hidden_states[-1][torch.arange(len(embed_indices)), embed_indices]


def main(job_path: str, out_path: str) -> None:
    job = json.loads(open(job_path, encoding="utf-8").read())
    name = job["checkpoint"]
    processor = AutoProcessor.from_pretrained(name, min_pixels=job["min_pixels"], max_pixels=job["max_pixels"])
    config = AutoConfig.from_pretrained(name)
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        name, config=config, torch_dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    results = []
    for item in job["items"]:
        images = [Image.open(item["image"])] if item["image"] else None
        instruction = processor.apply_chat_template(
            construct_prompt(item["text"]), tokenize=False, add_generation_prompt=True
        )
        if item["side"] == "query":
            inputs = processor(text=instruction, images=images, return_tensors="pt")
            vector, tokens = encode_and_generate(model, processor, inputs, job["max_new_tokens"])
        else:
            inputs = processor(text=instruction + "<emb>", images=images, return_tensors="pt")
            vector, tokens = ar_encode(model, processor, inputs), []
        results.append({"tokens": tokens, "embedding": vector[0].float().tolist()})
    report = {"transformers": transformers.__version__, "loading_info": {k: list(map(str, v)) for k, v in info.items()}}
    json.dump({**report, "results": results}, open(out_path, "w", encoding="utf-8"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
