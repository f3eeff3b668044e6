"""Vectors compared as the adapters promise: the encoder's own, up to float noise (cosine >= 0.9999)."""

from __future__ import annotations

from typing import Any

import numpy as np


def assert_same_vectors(actual: Any, expected: Any) -> None:
    actual, expected = np.atleast_2d(np.asarray(actual, dtype=np.float64)), np.atleast_2d(np.asarray(expected))
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    cosine = np.sum(actual * expected, axis=1) / (np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1))
    assert np.all(cosine >= 0.9999), cosine
