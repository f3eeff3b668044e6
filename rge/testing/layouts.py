"""Writing a tiny checkpoint in the files transformers 4.51.3 wrote (the published one) or in 5.x's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..loading import transformers_progress_bars
from .tokenizer import QWEN25_VL_CHAT_TEMPLATE

LEGACY_TRANSFORMERS_VERSION = "4.51.3"
"""The version that saved the published checkpoint."""


def save_transformers5(out: Path, model: Any, tokenizer: Any, generation: dict[str, Any] | None) -> None:
    """``save_pretrained`` as transformers 5.x writes it, plus the tokenizer, template and image processor."""
    from transformers import GenerationConfig

    if generation is not None:
        model.generation_config = GenerationConfig(**generation)
    with transformers_progress_bars(show=False):
        model.save_pretrained(out)
    if generation is None:
        (out / "generation_config.json").unlink(missing_ok=True)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN25_VL_CHAT_TEMPLATE, encoding="utf-8")
    processor = {"image_processor": _image_processor_dict(), "processor_class": "Qwen2_5_VLProcessor"}
    write_json(out / "processor_config.json", processor)


def save_transformers4(out: Path, model: Any, tokenizer: Any, generation: dict[str, Any] | None) -> None:
    """The published checkpoint's files: flat config, 4.5x key names, tied head not stored, 2 shards."""
    from safetensors.torch import save_file

    write_json(out / "config.json", flat_config(model.config))
    if generation is not None:
        write_json(out / "generation_config.json", {**generation, "transformers_version": LEGACY_TRANSFORMERS_VERSION})
    weights = {
        legacy_weight_name(name): tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if not (name == "lm_head.weight" and model.config.tie_word_embeddings)
    }
    names = sorted(weights)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: weights[name] for name in shard}, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(out / "preprocessor_config.json", {**_image_processor_dict(), "processor_class": "Qwen2_5_VLProcessor"})
    write_json(out / "chat_template.json", {"chat_template": QWEN25_VL_CHAT_TEMPLATE})
    _save_legacy_tokenizer(out, tokenizer)


def flat_config(config: Any) -> dict[str, Any]:
    """The config.json transformers 4.51.3 wrote for Qwen2.5-VL: text fields at the top level, no
    ``text_config``, ``rope_scaling`` with ``type``/``rope_type`` "default", ``torch_dtype``."""
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "image_token_id": config.image_token_id,
        "initializer_range": text.initializer_range,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.max_window_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": {"mrope_section": list(rope["mrope_section"]), "rope_type": "default", "type": "default"},
        "rope_theta": rope["rope_theta"],
        "sliding_window": 32768,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "torch_dtype": "float32",
        "transformers_version": LEGACY_TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_sliding_window": False,
        "video_token_id": config.video_token_id,
        "vision_config": {
            "depth": vision.depth,
            "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "hidden_act": vision.hidden_act,
            "hidden_size": vision.hidden_size,
            "in_channels": 3,
            "intermediate_size": vision.intermediate_size,
            "model_type": "qwen2_5_vl",
            "num_heads": vision.num_heads,
            "out_hidden_size": vision.out_hidden_size,
            "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "tokens_per_second": vision.tokens_per_second,
            "torch_dtype": "float32",
            "window_size": vision.window_size,
        },
        "vision_end_token_id": config.vision_end_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_token_id": config.vision_start_token_id + 2,
        "vocab_size": text.vocab_size,
    }


def legacy_weight_name(name: str) -> str:
    """A 5.x weight name as 4.51.3 stored it (``model.layers.*``, ``visual.*``)."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return old + name[len(new) :]
    return name


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


def _save_legacy_tokenizer(out: Path, tokenizer: Any) -> None:
    """tokenizer.json, vocab.json and merges.txt plus a 4.5x-style tokenizer_config.json."""
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    write_json(out / "vocab.json", bpe["vocab"])
    merges = [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
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
    write_json(
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
            "processor_class": "Qwen2_5_VLProcessor",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
