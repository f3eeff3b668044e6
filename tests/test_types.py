"""The public API's types: what a type checker infers from calls to it (mypy run on a small typed module),
the closed sets of option strings against what the code accepts, the encoder protocol, Rationales' repr."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest
from mypy import api

import rge
from rge.encoder import KV_CACHES
from rge.engine.slot_batches import BATCHES
from rge.prompts import TASK_PROMPTS
from rge.types import EncoderProtocol, KVCache, PromptName, Rationales

ROOT = Path(rge.__file__).resolve().parents[1]

# Libraries the public types do not come from: mypy treats them as Any, which keeps a cold run short.
UNTYPED = (
    "transformers huggingface_hub tokenizers safetensors tqdm jinja2 yaml pyarrow fastapi starlette "
    "uvicorn prometheus_client pydantic ray langchain_core llama_index mteb sentence_transformers peft"
).split()

PRELUDE = """\
import torch
from rge import RGEEncoder, load_embeddings
from rge.serving import ServerSettings
from rge.serving.app import create_app
from rge.types import EncoderProtocol, Rationales


def calls(encoder: RGEEncoder, texts: list[str], tensor: torch.Tensor) -> None:
"""

REVEALED = {
    "encoder.encode_query(texts)": "ndarray",
    'encoder.encode_query("one query")': "ndarray",
    "encoder.encode_query(texts, return_rationales=True)": "tuple[ndarray, Rationales]",
    'encoder.encode_query("one query", return_rationales=True)': "tuple[ndarray, str]",
    "encoder.encode_query(texts, return_rationales=True, convert_to_tensor=True)": "tuple[Tensor, Rationales]",
    "encoder.encode_document(texts)": "ndarray",
    "encoder.encode_document(texts, convert_to_tensor=True)": "Tensor",
    'encoder.encode_document(texts, batch_size=8, prompt_name="vqa", normalize=False)': "ndarray",
    "encoder.encode(texts, reason=False, convert_to_tensor=True)": "Tensor",
    'encoder.encode({"text": "a cat", "image": "cat.png"}, return_rationales=True)': "tuple[ndarray, str]",
    "encoder.similarity(encoder.encode(texts), encoder.encode(texts))": "ndarray",
    "encoder.similarity(tensor, encoder.encode(texts))": "Tensor",
    'load_embeddings("index")': "ndarray",
    'load_embeddings("index", return_ids=True)': "tuple[ndarray, list[str]]",
    'load_embeddings("index", return_ids=True, return_rationales=True)': "tuple[ndarray, list[str], list[str]]",
}

ACCEPTED = [
    'RGEEncoder.from_pretrained("x", dtype="bfloat16", attn_implementation="sdpa", kv_cache="static")',
    'RGEEncoder.from_pretrained("x", dtype=torch.float16, device="cuda:1")',
    "as_protocol: EncoderProtocol = encoder",
    "create_app(ServerSettings(), lambda: encoder)",
]

REFUSED = [
    'RGEEncoder.from_pretrained("x", kv_cache="paged")',
    'RGEEncoder.from_pretrained("x", dtype="float8")',
    'encoder.encode_query(texts, prompt_name="no_such_task")',
    "encoder.encode_document(texts, batch_sise=8)",
    "rationales: Rationales = encoder.encode_query(texts)",
]


def _short(revealed: str) -> str:
    """mypy's spelling of a type without the parts that vary between numpy and torch versions."""
    revealed = re.sub(r"numpy\.ndarray\[[^\[\]]*(\[[^\[\]]*\][^\[\]]*)*\]", "ndarray", revealed)
    return revealed.replace("torch._tensor.Tensor", "Tensor").replace("rge.types.Rationales", "Rationales")


def _mypy(tmp_path: Path, body: list[str]) -> dict[int, list[str]]:
    """mypy's errors and revealed types for ``body`` (lines of a function using rge), by index in ``body``."""
    module = tmp_path / "uses_rge.py"
    module.write_text(PRELUDE + "".join(f"    {line}\n" for line in body), encoding="utf-8")
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\nmypy_path = {ROOT}\nfollow_imports = silent\nignore_missing_imports = True\n"
                      f"[mypy-{','.join(name + '.*' for name in UNTYPED)}]\nfollow_imports = skip\n")  # fmt: skip
    stdout, stderr, _ = api.run(["--config-file", str(config), "--cache-dir", str(tmp_path / "cache"),
                                 "--no-error-summary", "--hide-error-context", str(module)])  # fmt: skip
    assert not stderr, stderr
    first = PRELUDE.count("\n") + 1
    found: dict[int, list[str]] = {}
    for match in re.finditer(r"^.*uses_rge\.py:(\d+): (note|error): (.*)$", stdout, re.MULTILINE):
        if match[2] == "error" or match[3].startswith("Revealed type is "):
            found.setdefault(int(match[1]) - first, []).append(match[3].removeprefix("Revealed type is "))
    return found


@pytest.mark.slow
def test_a_type_checker_sees_what_each_call_returns_and_refuses_unknown_options(tmp_path):
    found = _mypy(tmp_path, [f"reveal_type({call})" for call in REVEALED] + ACCEPTED + REFUSED)
    revealed = [_short(found.get(index, ['"?"'])[0].strip('"')) for index in range(len(REVEALED))]
    assert dict(zip(REVEALED, revealed)) == REVEALED, found
    refused = [line for index, line in enumerate(ACCEPTED + REFUSED, start=len(REVEALED)) if index in found]
    assert refused == REFUSED, found


def test_option_literals_are_the_values_the_code_accepts():
    assert set(get_args(KVCache)) == set(KV_CACHES) == {"auto", *BATCHES}
    tasks = {name.rsplit("_", 1)[0] for name in TASK_PROMPTS}
    assert set(get_args(PromptName)) == tasks | set(TASK_PROMPTS)


def test_the_encoder_is_an_encoder_protocol_and_other_objects_are_not(encoder):
    assert isinstance(encoder, EncoderProtocol)
    assert not isinstance(object(), EncoderProtocol)


def test_rationales_repr_shows_texts_and_counts():
    rationales = Rationales(["a cat", ""], [[5, 6, 7], []])
    assert repr(rationales) == "Rationales(['a cat', ''], num_generated_tokens=[3, 0])"
    assert rationales == ["a cat", ""]
