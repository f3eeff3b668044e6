"""Crash-safe files: written under a temporary name, then renamed into place, so a file is whole or absent.

Every file rge writes follows the process umask, as ``open`` would make it; safetensors files too, which
safetensors itself leaves readable by their owner alone (``follow_umask``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a crash never leaves a partial file there."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def changed_settings(path: Path, settings: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded, now)}`` for each of ``settings`` that differs from the JSON file at ``path``.

    Empty when the file does not exist yet: a new output folder is compatible with any settings.
    """
    if not path.exists():
        return {}
    recorded = json.loads(path.read_text(encoding="utf-8"))
    return {key: (recorded.get(key), value) for key, value in settings.items() if recorded.get(key) != value}


def save_arrays(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, Any] | None = None) -> None:
    """Save numpy arrays as safetensors atomically; ``metadata`` values are stored as JSON."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    encoded = {key: json.dumps(value, ensure_ascii=False) for key, value in (metadata or {}).items()}
    save_file({key: np.ascontiguousarray(value) for key, value in arrays.items()}, str(temporary), metadata=encoded)
    follow_umask(temporary)
    os.replace(temporary, path)


def follow_umask(path: Path) -> None:
    """Give the file at ``path`` (a folder: each ``*.safetensors`` file in it) the mode ``open`` would have.

    safetensors 0.8 and later write through a private temporary file and rename it, so its files come out
    0600 whatever the umask; call this after every safetensors write, ``save_pretrained``'s included.
    """
    mode = 0o666 & ~process_umask()
    for file in path.glob("*.safetensors") if path.is_dir() else [path]:
        file.chmod(mode)


def process_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``); elsewhere it
    is set and put back at once (``os.umask`` has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and JSON metadata of a file written by ``save_arrays``."""
    with safe_open(str(path), framework="numpy") as handle:
        metadata = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
    return load_file(str(path)), metadata
