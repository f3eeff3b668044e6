"""What the engine reads and changes inside transformers beyond its documented API, in one place.

transformers has no public way to ask which attention implementation a model was loaded with: its modules
read the private ``config._attn_implementation`` (set for every sub-config). The functions they call are
looked up by that name in ``AttentionInterface``'s library-wide mapping, which ``register`` changes for
every model. ``tests/test_transformers_internals.py`` checks each function here against the installed
transformers, so a release that moves one of them fails there, by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def attention_implementation(config: Any) -> str:
    """The attention implementation ``config``'s modules run ("sdpa", "eager", "flash_attention_2", a hub
    kernel's name...); "" when none is set (a config not loaded with a model)."""
    return str(config._attn_implementation or "")


def attention_function(config: Any, eager: Callable[..., Any]) -> Callable[..., Any]:
    """The attention function a module of ``config`` calls, as transformers' own modules look it up
    (``eager``, the module's own, for "eager")."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)  # type: ignore[no-any-return]


def registered_attention(name: str) -> Callable[..., Any]:
    """The function registered as ``name`` for every model (KeyError when none is): a fresh
    ``AttentionInterface`` holds no local override, so it reads the library-wide mapping."""
    return AttentionInterface()[name]  # type: ignore[no-any-return]


def register_attention(name: str, function: Callable[..., Any]) -> None:
    """Make ``function`` the attention every model loaded with ``name`` calls."""
    AttentionInterface.register(name, function)
