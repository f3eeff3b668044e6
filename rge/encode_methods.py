"""The sentence-transformers methods ``RGEEncoder`` builds on its ``encode``: ``encode_query`` (the query path),
``encode_document`` (the candidate path) and ``similarity``.

The overloads tell a type checker (and an editor) what a call returns: an array or a tensor
(``convert_to_tensor``), alone or with its rationales (``return_rationales``; one item, a str or a dict, has
one rationale, a str). Overloads are for type checkers only; the plain definitions are what runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import torch

from .engine.pooling import l2_normalize
from .errors import RGEInputError
from .types import Embeddings, EncodeInput, EncodeOptions, EncodeResult, ImagesInput, PromptName, Rationales, TextInput

if TYPE_CHECKING:
    from typing_extensions import Unpack


class EncodeMethods:
    """``RGEEncoder``'s ``encode_query``, ``encode_document`` and ``similarity`` (a base class: ``encode`` and
    ``embedding_dim`` are the encoder's)."""

    if TYPE_CHECKING:

        def encode(self, *args: Any, **kwargs: Any) -> Any: ...

        @property
        def embedding_dim(self) -> int: ...

    # fmt: off
    @overload
    def encode_query(  # type: ignore[overload-overlap]
        self, texts: TextInput, images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[True], convert_to_numpy: bool = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[torch.Tensor, str]: ...
    @overload
    def encode_query(  # type: ignore[overload-overlap]
        self, texts: TextInput, images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[False] = ..., convert_to_numpy: Literal[True] = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[np.ndarray, str]: ...
    @overload
    def encode_query(
        self, texts: Iterable[TextInput], images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[True], convert_to_numpy: bool = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[torch.Tensor, Rationales]: ...
    @overload
    def encode_query(
        self, texts: Iterable[TextInput], images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[False] = ..., convert_to_numpy: Literal[True] = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[np.ndarray, Rationales]: ...
    @overload
    def encode_query(
        self, texts: EncodeInput | None = ..., images: ImagesInput = ..., *, return_rationales: Literal[False] = ...,
        convert_to_tensor: Literal[True], convert_to_numpy: bool = ..., **options: Unpack[EncodeOptions]
    ) -> torch.Tensor: ...
    @overload
    def encode_query(
        self, texts: EncodeInput | None = ..., images: ImagesInput = ..., *, return_rationales: Literal[False] = ...,
        convert_to_tensor: Literal[False] = ..., convert_to_numpy: Literal[True] = ..., **options: Unpack[EncodeOptions]
    ) -> np.ndarray: ...
    @overload
    def encode_query(
        self, texts: EncodeInput | None = ..., images: ImagesInput = ..., *, return_rationales: bool = ...,
        convert_to_tensor: bool = ..., convert_to_numpy: bool = ..., **options: Unpack[EncodeOptions]
    ) -> EncodeResult: ...
    # fmt: on
    def encode_query(
        self, texts: EncodeInput | None = None, images: ImagesInput = None, *, reason: bool = True,
        batch_size: int = 16, normalize: bool = True, show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True, convert_to_tensor: bool = False, return_rationales: bool = False,
        max_new_tokens: int | None = None, exif_transpose: bool = True, repetition_penalty: float | None = None,
        prompt: str | None = None, prompt_name: PromptName | None = None, **unknown: Any,
    ) -> EncodeResult:  # fmt: skip
        """``encode`` on the query path: each item reasons before it is embedded.

        ``encode``'s parameters: ``texts``, ``images``, then by keyword ``batch_size``, ``normalize``,
        ``show_progress_bar``; ``convert_to_tensor`` / ``convert_to_numpy`` (a tensor rather than numpy);
        ``return_rationales`` (``(embeddings, Rationales)``, a str for a single item); ``max_new_tokens``,
        ``repetition_penalty``, ``exif_transpose``, ``prompt`` / ``prompt_name``;
        ``reason=False`` takes the candidate path instead.
        """
        return self.encode(
            texts, images, reason, batch_size, normalize, show_progress_bar, convert_to_numpy, convert_to_tensor,
            return_rationales, max_new_tokens, exif_transpose=exif_transpose, repetition_penalty=repetition_penalty,
            prompt=prompt, prompt_name=prompt_name, **unknown,
        )  # fmt: skip

    # fmt: off
    @overload
    def encode_document(  # type: ignore[overload-overlap]
        self, texts: TextInput, images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[True], convert_to_numpy: bool = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[torch.Tensor, str]: ...
    @overload
    def encode_document(  # type: ignore[overload-overlap]
        self, texts: TextInput, images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[False] = ..., convert_to_numpy: Literal[True] = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[np.ndarray, str]: ...
    @overload
    def encode_document(
        self, texts: Iterable[TextInput], images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[True], convert_to_numpy: bool = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[torch.Tensor, Rationales]: ...
    @overload
    def encode_document(
        self, texts: Iterable[TextInput], images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[False] = ..., convert_to_numpy: Literal[True] = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[np.ndarray, Rationales]: ...
    @overload
    def encode_document(
        self, texts: EncodeInput | None = ..., images: ImagesInput = ..., *, return_rationales: Literal[False] = ...,
        convert_to_tensor: Literal[True], convert_to_numpy: bool = ..., **options: Unpack[EncodeOptions]
    ) -> torch.Tensor: ...
    @overload
    def encode_document(
        self, texts: EncodeInput | None = ..., images: ImagesInput = ..., *, return_rationales: Literal[False] = ...,
        convert_to_tensor: Literal[False] = ..., convert_to_numpy: Literal[True] = ..., **options: Unpack[EncodeOptions]
    ) -> np.ndarray: ...
    @overload
    def encode_document(
        self, texts: EncodeInput | None = ..., images: ImagesInput = ..., *, return_rationales: bool = ...,
        convert_to_tensor: bool = ..., convert_to_numpy: bool = ..., **options: Unpack[EncodeOptions]
    ) -> EncodeResult: ...
    # fmt: on
    def encode_document(
        self, texts: EncodeInput | None = None, images: ImagesInput = None, *, reason: bool = False,
        batch_size: int = 16, normalize: bool = True, show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True, convert_to_tensor: bool = False, return_rationales: bool = False,
        max_new_tokens: int | None = None, exif_transpose: bool = True, repetition_penalty: float | None = None,
        prompt: str | None = None, prompt_name: PromptName | None = None, **unknown: Any,
    ) -> EncodeResult:  # fmt: skip
        """``encode`` on the candidate path (one forward pass, no reasoning) unless ``reason=True`` is given.

        ``encode``'s parameters: ``texts``, ``images``, then by keyword ``batch_size``, ``normalize``,
        ``show_progress_bar``; ``convert_to_tensor`` / ``convert_to_numpy`` (a tensor rather than numpy);
        ``return_rationales`` (``(embeddings, Rationales)``, a str for a single item); ``max_new_tokens``,
        ``repetition_penalty``, ``exif_transpose``, ``prompt`` / ``prompt_name``;
        ``reason=True`` reasons first.
        """
        return self.encode(
            texts, images, reason, batch_size, normalize, show_progress_bar, convert_to_numpy, convert_to_tensor,
            return_rationales, max_new_tokens, exif_transpose=exif_transpose, repetition_penalty=repetition_penalty,
            prompt=prompt, prompt_name=prompt_name, **unknown,
        )  # fmt: skip

    @overload
    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...
    @overload
    def similarity(self, a: torch.Tensor, b: Embeddings) -> torch.Tensor: ...
    @overload
    def similarity(self, a: Embeddings, b: torch.Tensor) -> torch.Tensor: ...
    def similarity(self, a: Embeddings, b: Embeddings) -> Embeddings:
        """Cosine similarity matrix (len(a), len(b)); numpy in gives numpy out, a tensor gives a tensor.

        ``a`` and ``b`` are one vector (D,) or a matrix (N, D) of this encoder's dimension D each.
        """
        left, right = (l2_normalize(self._as_matrix(x, name)) for x, name in ((a, "a"), (b, "b")))
        scores = left @ right.T
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return scores
        return scores.numpy()

    def _as_matrix(self, vectors: Embeddings, name: str) -> torch.Tensor:
        matrix = torch.as_tensor(vectors).float()
        matrix = matrix[None] if matrix.ndim == 1 else matrix
        if matrix.ndim != 2 or matrix.shape[1] != self.embedding_dim:
            dim = self.embedding_dim
            raise RGEInputError(
                f"similarity: {name} has shape {tuple(torch.as_tensor(vectors).shape)}; expected ({dim},) "
                f"or (N, {dim}), this encoder's embedding dimension"
            )
        return matrix
