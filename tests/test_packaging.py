"""The distribution: sdist and wheel build, and the wheel installs into a fresh venv and runs outside the
source tree, under its own name (``rge-embeddings``) with the import name ``rge``."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from rge import __version__

from .processes import run_bounded

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return run_bounded(command, timeout=900, check=True, **kwargs)  # (a build, or an install into a venv)


def test_wheel_installs_in_a_fresh_venv_and_runs_the_tiny_demo(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(ROOT)])  # wheel from sdist
    (wheel,) = dist.glob("rge_embeddings-*.whl")
    (sdist,) = dist.glob("rge_embeddings-*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    for packaged in ("rge/py.typed", "rge/eval/data/instruction_replacements-eval.yaml", "rge/cli/__main__.py",
                     "rge/__main__.py", "rge/testing/__main__.py", "rge/testing/layouts.py",
                     "rge/engine/decoder.py"):  # fmt: skip
        assert packaged in names, packaged
    assert not any(name.startswith("tests/") for name in names)
    metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
    assert "Name: rge-embeddings" in zipfile.ZipFile(wheel).read(metadata).decode()

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python, rge = venv / "bin" / "python", venv / "bin" / "rge"
    torch_version = torch.__version__.split("+")[0]
    _run([str(python), "-m", "pip", "install", "--quiet", f"torch=={torch_version}"])  # the CPU wheel on disk
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = _run([str(python), "-c", "import rge; print(rge.__file__)"], cwd=outside, env=env).stdout
    assert str(venv) in where and str(ROOT) not in where
    assert _run([str(rge), "--version"], cwd=outside, env=env).stdout.strip() == f"rge {__version__} (rge-embeddings)"
    demo = _run([str(rge), "demo", "--tiny", "--device", "cpu"], cwd=outside, env=env)
    assert "rationale:" in demo.stdout and demo.stdout.count("Summarize the following answer") == 2
    assert sdist.stat().st_size > 0
