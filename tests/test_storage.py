"""Files rge writes follow the process umask, safetensors files included (safetensors alone makes them 0600)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from rge.storage import atomic_write_json, follow_umask, load_arrays, process_umask, save_arrays

from .conftest import file_modes


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], indirect=True, ids=oct)
def test_saved_arrays_follow_the_umask_like_json_beside_them(umask, tmp_path):
    save_arrays(tmp_path / "a.safetensors", {"x": np.arange(3.0)}, {"ids": ["a"]})
    atomic_write_json(tmp_path / "manifest.json", {"complete": True})
    assert file_modes(tmp_path) == {"a.safetensors": 0o666 & ~umask, "manifest.json": 0o666 & ~umask}
    arrays, metadata = load_arrays(tmp_path / "a.safetensors")
    assert metadata == {"ids": ["a"]} and arrays["x"].tolist() == [0.0, 1.0, 2.0]


def test_follow_umask_fixes_every_safetensors_file_of_a_folder(umask, tmp_path):
    for name in ("model-1.safetensors", "model-2.safetensors"):
        save_file({"x": np.zeros(2)}, str(tmp_path / name))
    (tmp_path / "private.txt").write_text("left alone")
    os.chmod(tmp_path / "private.txt", 0o600)
    follow_umask(tmp_path)
    assert file_modes(tmp_path) == {"model-1.safetensors": 0o664, "model-2.safetensors": 0o664, "private.txt": 0o600}


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True, ids=oct)
def test_the_umask_is_read_without_changing_it(umask):
    assert process_umask() == umask
    assert os.umask(umask) == umask  # still in force
