"""rge: Reasoning Guided Embeddings for text and images.

>>> from rge import RGEEncoder
>>> encoder = RGEEncoder.from_pretrained("MCG-NJU/RGE")               # doctest: +SKIP
>>> queries = encoder.encode_query(["What is in the image?"], images=[photo])   # doctest: +SKIP
>>> documents = encoder.encode_document(["A cat and a dog.", "A cat and a tiger."])  # doctest: +SKIP
>>> encoder.similarity(queries, documents)                          # doctest: +SKIP

``import rge`` loads no model code: ``RGEEncoder``, ``Rationales``, ``load_embeddings`` and
``RGEDecodingWarning`` are imported on first use (torch with them, transformers only when a model loads), so
``rge --help`` answers at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._about import DISTRIBUTION, __version__
from ._lazy import lazy_exports
from .errors import RGECheckpointError, RGEError, RGEInputError, RGEMissingExtraError, RGEModelNotFoundError

if TYPE_CHECKING:
    from .corpus import load_embeddings
    from .encoder import RGEEncoder
    from .engine.decoding_settings import RGEDecodingWarning
    from .types import Rationales

__all__ = [
    "DISTRIBUTION",
    "RGECheckpointError",
    "RGEDecodingWarning",
    "RGEEncoder",
    "RGEError",
    "RGEInputError",
    "RGEMissingExtraError",
    "RGEModelNotFoundError",
    "Rationales",
    "__version__",
    "load_embeddings",
]

_LAZY = {
    "RGEEncoder": ".encoder",
    "RGEDecodingWarning": ".engine.decoding_settings",
    "Rationales": ".types",
    "load_embeddings": ".corpus",
}
"""Public names imported on first use, and the module each comes from."""


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
