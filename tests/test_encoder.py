"""RGEEncoder as users print it: a short repr with what it was loaded from and how it runs, nothing dumped."""

from __future__ import annotations

from .conftest import BUDGET


def test_repr_names_the_model_and_settings_without_dumping_it(encoder, tiny_path):
    expected = (f"RGEEncoder(model={str(tiny_path.resolve())!r}, device={str(encoder.device)!r}, dtype=torch.float32, "
                f"max_new_tokens={BUDGET}, kv_cache='auto')")  # fmt: skip
    assert repr(encoder) == expected
    checkpoint = repr(encoder.checkpoint)
    assert checkpoint.startswith("LoadedCheckpoint(emb_token_id=")
    assert "Qwen2_5" not in checkpoint and "Tokenizer" not in checkpoint and "<|im_start|>" not in checkpoint
