"""Tiny RGE-shaped checkpoints, built offline in seconds, to test code and pipelines without a download.

A tiny checkpoint has the real structure (``Qwen2_5_VLForConditionalGeneration``, the real special
tokens and chat template, the same image processor) with random weights, a small byte-level BPE and
either file layout. Random models almost never emit ``<emb>``, so ``<emb>``'s output row is made to win
wherever one chosen ordinary token would: rationales then end at different steps for different inputs,
some never before the budget, as the real model's do.

>>> from rge.testing import build_tiny_checkpoint
>>> path = build_tiny_checkpoint("/tmp/tiny-rge")          # doctest: +SKIP
>>> encoder = RGEEncoder.from_pretrained(path)              # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

Layout = Literal["transformers5", "transformers4"]

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

PROBE_PROMPTS = [
    "What is in the image?",
    "Find the caption of this photo.",
    "Which animal is on the left side of the picture?",
    "cat",
    "Summarize: a red car parked by a tree near the river.",
    "Retrieve a Wikipedia paragraph that answers this question.",
    "How many people are standing in the kitchen, and what are they cooking for dinner tonight?",
    "dog and tiger",
    "Represent the given news headline for retrieval.",
    "Is the umbrella red or blue?",
    "A forest in winter.",
    "Select the object labeled as a bicycle in the scene.",
]


def build_tiny_checkpoint(
    path: str | os.PathLike[str],
    *,
    layout: Layout = "transformers5",
    seed: int = 0,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    with_emb_token: bool = True,
    emb_budget: int = 32,
) -> Path:
    """Write a tiny RGE-shaped checkpoint to ``path`` and return it.

    ``layout`` picks the files: ``"transformers5"`` (``processor_config.json``, ``chat_template.jinja``, one
    safetensors file) or ``"transformers4"`` (what the published checkpoint has: ``preprocessor_config.json``,
    ``chat_template.json``, a flat ``config.json``, 4.5x weight names, sharded safetensors with an index).
    ``emb_budget`` is the decoding budget the ``<emb>`` trigger is tuned for. ``with_emb_token=False`` builds
    a plain Qwen2.5-VL checkpoint, which rge must refuse.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(with_emb_token=with_emb_token)
    head_dim = hidden_size // num_attention_heads
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": _mrope_section(head_dim),
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [vision_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _spread_weights(model, seed)
    if with_emb_token:
        _install_emb_trigger(model, tokenizer, emb_budget)
    if layout == "transformers5":
        _save_transformers5(out, model, tokenizer)
    elif layout == "transformers4":
        _save_transformers4(out, model, tokenizer)
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'transformers5' or 'transformers4'")
    return out


def _save_quietly(model: Any, out: Path) -> None:
    """``save_pretrained`` without its progress bar (a tiny checkpoint writes in milliseconds)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if enabled:
            logging.enable_progress_bar()


def build_tiny_tokenizer(*, with_emb_token: bool = True) -> Any:
    """A byte-level BPE (a few hundred tokens) with Qwen2.5-VL's special tokens and ``<emb>``."""
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


def make_test_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic, structured test image (different seeds give different content)."""
    generator = torch.Generator().manual_seed(seed)
    channels = 1 if mode in ("L", "1", "P") else (4 if mode == "RGBA" else 3)
    low = torch.randint(0, 256, (max(1, height // 8), max(1, width // 8), channels), generator=generator)
    pixels = (
        torch.nn.functional.interpolate(
            low.permute(2, 0, 1)[None].float(), size=(height, width), mode="bilinear", align_corners=False
        )[0]
        .permute(1, 2, 0)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
    )
    array = pixels.numpy()
    image = Image.fromarray(array[..., 0] if channels == 1 else array, "L" if channels == 1 else mode)
    return image.convert(mode) if image.mode != mode else image


def image_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    """``image`` encoded as ``format`` bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def install_in_hf_cache(checkpoint: str | os.PathLike[str], repo_id: str, cache_dir: str | os.PathLike[str]) -> Path:
    """Place a local checkpoint in a Hugging Face hub cache as ``repo_id``, so hub loading works offline."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in Path(checkpoint).iterdir():
        if file.is_file():
            (snapshot / file.name).write_bytes(file.read_bytes())
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Larger random weights than the default init, so hidden states and logits vary across inputs."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and "norm" not in name:
                parameter.normal_(0.0, 0.5 / parameter.shape[1] ** 0.5 * 2, generator=generator)


def _install_emb_trigger(model: Any, tokenizer: Any, budget: int) -> None:
    """Make ``<emb>`` the greedy choice wherever one chosen ordinary token would be.

    The token is chosen by decoding the probe prompts: the one whose first appearance varies most across
    them, so that some prompts stop within a few steps and some never stop within ``budget``.
    """
    from .prompts import PromptTemplate

    template = PromptTemplate.from_chat_template(tokenizer, QWEN25_VL_CHAT_TEMPLATE)
    emb_id = tokenizer.convert_tokens_to_ids(EMB)
    ordinary = set(range(len(tokenizer))) - set(tokenizer.all_special_ids)
    first_steps: dict[int, list[int]] = {token: [] for token in ordinary}
    for prompt in PROBE_PROMPTS:
        generated = _greedy(model, tokenizer(template.query(prompt))["input_ids"], budget)
        seen: dict[int, int] = {}
        for step, token in enumerate(generated):
            seen.setdefault(token, step)
        for token in ordinary:
            first_steps[token].append(seen.get(token, budget))
    chosen = max(sorted(ordinary), key=lambda token: _trigger_score(first_steps[token], budget))
    with torch.no_grad():
        head = model.lm_head.weight
        head[emb_id] = head[chosen] * 1.02


def _trigger_score(steps: Sequence[int], budget: int) -> float:
    """Prefer tokens met early by some prompts, late by others and never by about a third."""
    never = sum(step >= budget for step in steps)
    met = [step for step in steps if step < budget]
    if not met or never == 0:
        return -1.0
    spread = len(set(met)) + (max(met) - min(met)) / budget
    balance = 1.0 - abs(never / len(steps) - 1 / 3)
    early = any(step <= 4 for step in met)
    return spread * balance + (2.0 if early else 0.0)


def _greedy(model: Any, input_ids: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([input_ids]),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(input_ids) :].tolist()


def _image_processor_dict() -> dict[str, object]:
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor",
        "merge_size": 2,
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 3136, "longest_edge": 12845056},
        "temporal_patch_size": 2,
    }


def _save_transformers5(out: Path, model: Any, tokenizer: Any) -> None:
    _save_quietly(model, out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN25_VL_CHAT_TEMPLATE, encoding="utf-8")
    processor = {"image_processor": _image_processor_dict(), "processor_class": "Qwen2_5_VLProcessor"}
    _write_json(out / "processor_config.json", processor)


def _save_transformers4(out: Path, model: Any, tokenizer: Any) -> None:
    from safetensors.torch import save_file

    _write_json(out / "config.json", _legacy_config(model.config.to_dict()))
    weights = {_legacy_weight_name(name): tensor.contiguous() for name, tensor in model.state_dict().items()}
    names = sorted(weights)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: weights[name] for name in shard}, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out / "preprocessor_config.json", {**_image_processor_dict(), "processor_class": "Qwen2_5_VLProcessor"})
    _write_json(out / "chat_template.json", {"chat_template": QWEN25_VL_CHAT_TEMPLATE})
    _save_legacy_tokenizer(out, tokenizer)


def _legacy_config(config: dict) -> dict:  # type: ignore[type-arg]
    """A 5.x Qwen2.5-VL config dict in the flat shape transformers 4.5x wrote."""
    text = dict(config.pop("text_config"))
    rope = text.pop("rope_parameters")
    for key in ("layer_types", "model_type", "dtype"):
        text.pop(key, None)
    vision = dict(config.pop("vision_config"))
    vision.pop("rope_parameters", None)
    legacy = {**config, **text}
    legacy.update(
        {
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
            "rope_theta": rope["rope_theta"],
            "vision_config": vision,
            "torch_dtype": "float32",
            "transformers_version": "4.51.3",
            "model_type": "qwen2_5_vl",
        }
    )
    legacy.pop("dtype", None)
    return legacy


def _legacy_weight_name(name: str) -> str:
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def _save_legacy_tokenizer(out: Path, tokenizer: Any) -> None:
    """tokenizer.json plus a 4.5x-style tokenizer_config.json (added_tokens_decoder, additional_special_tokens)."""
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(tokenizer.convert_tokens_to_ids(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in tokenizer.all_special_tokens
    }
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [t for t in tokenizer.all_special_tokens if t not in ("<|endoftext|>",)],
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
