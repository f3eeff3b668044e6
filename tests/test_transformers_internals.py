"""The parts of transformers the engine uses beyond its documented API still exist and behave as the engine
uses them; a release that moves one fails here with what moved, not deep inside a decode step."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from rge.engine.transformers_internals import (
    attention_function,
    attention_implementation,
    register_attention,
    registered_attention,
)

MOVED = f"transformers {transformers.__version__}: {{}}; rge.engine.transformers_internals must follow it"


def test_the_config_names_the_attention_the_model_was_loaded_with(encoder):
    """``PretrainedConfig._attn_implementation`` is what loading chose, on the config and its sub-configs."""
    assert isinstance(getattr(PretrainedConfig, "_attn_implementation", None), property), MOVED.format(
        "PretrainedConfig._attn_implementation is gone"
    )
    config = encoder.model.config
    for part in (config, config.vision_config, encoder.model.model.language_model.config):
        assert attention_implementation(part) == "sdpa", MOVED.format(f"{type(part).__name__} does not say sdpa")
    unset = PretrainedConfig()
    assert attention_implementation(unset) == ""
    unset._attn_implementation = "eager"
    assert attention_implementation(unset) == "eager", MOVED.format("_attn_implementation cannot be set")


def test_the_attention_a_module_calls_is_the_one_registered_under_its_name():
    """``register_attention`` replaces, for every model, what ``registered_attention`` and the models' own
    lookup (``attention_function``) give; "eager" gives the module's own function."""
    config = PretrainedConfig()
    config._attn_implementation = "sdpa"
    assert registered_attention("sdpa") is sdpa_attention_forward, MOVED.format("sdpa is registered otherwise")
    assert attention_function(config, qwen.eager_attention_forward) is sdpa_attention_forward
    config._attn_implementation = "eager"
    assert attention_function(config, qwen.eager_attention_forward) is qwen.eager_attention_forward

    def replacement(*args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
        raise AssertionError("not called here")

    try:
        register_attention("sdpa", replacement)
        config._attn_implementation = "sdpa"
        assert registered_attention("sdpa") is replacement, MOVED.format("AttentionInterface.register is ignored")
        assert attention_function(config, qwen.eager_attention_forward) is replacement, MOVED.format(
            "models no longer call what AttentionInterface.register registers"
        )
        assert qwen.ALL_ATTENTION_FUNCTIONS["sdpa"] is replacement
    finally:
        AttentionInterface.register("sdpa", sdpa_attention_forward)
    with pytest.raises(KeyError):
        registered_attention("no such attention")
