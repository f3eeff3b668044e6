"""The package's version and the name it is installed under (``import rge``, ``pip install rge-embeddings``)."""

__version__ = "0.1.0"
DISTRIBUTION = "rge-embeddings"
"""The name on the package index: ``rge`` there is an unrelated project."""
