from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from rge import RGEEncoder
from rge.testing import build_tiny_checkpoint, make_test_image

from .reference import Reference

# Small pixel budget for speed; the default budget has tests of its own.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 64 * 28 * 28
BUDGET = 32

logging.getLogger("transformers").setLevel(logging.ERROR)

# Property tests draw the same examples on every run (CI included): a failure is reproducible, never luck.
settings.register_profile("rge", derandomize=True, deadline=None, database=None, print_blob=True)
settings.load_profile("rge")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--rge-device",
        default=os.environ.get("RGE_TEST_DEVICE", "cpu"),
        help="device rge runs on in the engine tests, in float32 (default: $RGE_TEST_DEVICE or cpu); the "
        "authors' reference stays on the CPU",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """Where ``encoder`` runs: ``--rge-device`` or ``RGE_TEST_DEVICE`` (``benchmarks/gpu_check.sh`` sets cuda)."""
    chosen = str(request.config.getoption("--rge-device"))
    if chosen.startswith("cuda"):
        import torch

        torch.backends.cudnn.allow_tf32 = False  # the vision tower's convolution in true float32, as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = False
    return chosen


def load_tiny(path: Path, device: str, **options: object) -> RGEEncoder:
    """The tiny checkpoint on ``device`` in float32, with the tests' pixel budget and reasoning budget."""
    settings = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "max_new_tokens": BUDGET, **options}
    return RGEEncoder.from_pretrained(path, device=device, dtype="float32", **settings)  # type: ignore[arg-type]


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process umask for one test, restored after (0o002 unless parametrized with ``indirect=True``)."""
    mask = getattr(request, "param", 0o002)
    previous = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(previous)


def file_modes(folder: Path) -> dict[str, int]:
    """The permission bits of every file under ``folder``, by relative path."""
    return {path.relative_to(folder).as_posix(): stat.S_IMODE(path.stat().st_mode)
            for path in sorted(folder.rglob("*")) if path.is_file()}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shaped like the published checkpoint: 4.51.3 files, tied padded vocabulary, real norms, base decoding."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny4"), emb_budget=BUDGET)


@pytest.fixture(scope="session")
def tiny5_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model saved in the transformers 5.x layout."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny5"), layout="transformers5", emb_budget=BUDGET)


@pytest.fixture(scope="session")
def encoder(tiny_path: Path, device: str) -> RGEEncoder:
    return load_tiny(tiny_path, device)


@pytest.fixture(scope="session")
def reference(tiny_path: Path) -> Reference:
    return Reference.load(tiny_path, MIN_PIXELS, MAX_PIXELS)


@pytest.fixture(scope="session")
def mixed_items() -> list[tuple[str, object]]:
    """Texts with and without images of different sizes and aspect ratios."""
    return [
        ("What is in the image?", make_test_image(64, 48, seed=1)),
        ("cat", None),
        ("Find the caption of this photo.", make_test_image(200, 90, seed=2)),
        ("dog and tiger", None),
        ("Which animal is on the left side of the picture?", make_test_image(30, 120, seed=3)),
        ("How many people are standing in the kitchen, and what are they cooking for dinner tonight?", None),
        ("<|image_1|>\nRepresent the given image.", make_test_image(20, 90, seed=4)),
        ("Summarize: a red car parked by a tree near the river.", None),
        ("", make_test_image(333, 222, seed=5)),
        ("Is the umbrella red or blue?", None),
    ]


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two small PNG files on disk (paths as str), for the adapters that take image paths."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed in (1, 2):
        path = folder / f"img{seed}.png"
        make_test_image(60 + 10 * seed, 50, seed=seed).save(path)
        paths.append(str(path))
    return paths
