"""rge: Reasoning Guided Embeddings for text and images.

>>> from rge import RGEEncoder
>>> encoder = RGEEncoder.from_pretrained("MCG-NJU/RGE")               # doctest: +SKIP
>>> queries = encoder.encode_query(["What is in the image?"], images=[photo])   # doctest: +SKIP
>>> documents = encoder.encode_document(["A cat and a dog.", "A cat and a tiger."])  # doctest: +SKIP
>>> encoder.similarity(queries, documents)                          # doctest: +SKIP
"""

from __future__ import annotations

from ._about import DISTRIBUTION, __version__
from .corpus import load_embeddings
from .encoder import Rationales, RGEEncoder
from .errors import RGECheckpointError, RGEError, RGEInputError, RGEMissingExtraError, RGEModelNotFoundError

__all__ = [
    "DISTRIBUTION",
    "RGECheckpointError",
    "RGEEncoder",
    "RGEError",
    "RGEInputError",
    "RGEMissingExtraError",
    "RGEModelNotFoundError",
    "Rationales",
    "__version__",
    "load_embeddings",
]
