"""Start-up: ``import rge`` loads no model code, ``from rge import RGEEncoder`` no transformers, and the command's
``--version`` and ``--help`` answer without torch; every public name still imports. Each check runs in a fresh
interpreter, as a user's first command does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import rge

ROOT = Path(rge.__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "huggingface_hub", "pyarrow", "jinja2", "yaml", "safetensors", "tokenizers")


def imported_after(code: str) -> list[str]:
    """Which of ``HEAVY`` a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.splitlines()[-1]))


def test_import_rge_loads_no_model_code():
    assert imported_after("import rge") == []


def test_the_encoder_class_comes_with_torch_but_not_transformers():
    assert imported_after("from rge import RGEEncoder") == ["torch"]


@pytest.mark.parametrize(
    "argv",
    [["--version"], ["--help"], ["demo", "--help"], ["encode", "--help"], ["eval", "mmeb", "--help"],
     ["serve", "--help"], ["train", "--help"]],
)  # fmt: skip
def test_version_and_help_import_neither_torch_nor_transformers(argv):
    code = f"from rge.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as done:\n    assert done.code == 0"
    assert imported_after(code) == []


def test_python_dash_m_rge_help_imports_no_torch():
    """Read from the interpreter's own import log (``-X importtime``), with the package's ``__main__``."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "rge", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "usage: rge" in done.stdout, done.stderr
    modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "rge.cli" in modules
    assert not {name for name in modules if name.split(".")[0] in ("torch", "transformers")}


@pytest.mark.parametrize("package", ["rge", "rge.training", "rge.serving"])
def test_every_public_name_imports(package):
    """``from <package> import X`` for each name of its ``__all__`` (some are imported on first use)."""
    code = (
        f"import importlib\npackage = importlib.import_module({package!r})\n"
        f"for name in package.__all__:\n    exec(f'from {package} import {{name}}')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'RGEEncodr'"):
        rge.RGEEncodr  # noqa: B018
    with pytest.raises(ImportError):
        from rge import RGEEncodr  # noqa: F401
