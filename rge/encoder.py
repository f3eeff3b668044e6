"""RGEEncoder: the public face of rge, with the sentence-transformers contract users know."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, overload

import numpy as np
import torch

from .encode_methods import EncodeMethods
from .engine.batching import ModelBatch, TokenizedItem, collate
from .engine.decode_config import GREEDY, DecodeConfig, TokenChoice
from .engine.decoding_settings import GenerationSettings
from .engine.pooling import l2_normalize
from .errors import RGEInputError
from .loading import (
    LoadedCheckpoint,
    choose_attention,
    choose_device,
    choose_dtype,
    load_checkpoint,
    resolve_checkpoint,
)
from .pipeline import InputPipeline
from .prompts import EMB_TOKEN, resolve_prompt
from .tokenization import PromptTokenizer
from .types import (
    AttnImplementation,
    DTypeName,
    Embeddings,
    EncodeInput,
    EncodeOptions,
    EncodeResult,
    ImagesInput,
    KVCache,
    PromptName,
    Rationales,
    TextInput,
)
from .vision import pixel_budget

# The engine's modules that import transformers are imported where they are used, when a model is loaded or
# run: ``from rge import RGEEncoder`` costs little more than torch (docs/performance.md, "Start-up").
if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .engine.decoder import ReasoningDecoder

KV_CACHES: tuple[str, ...] = get_args(KVCache)
"""The ``kv_cache`` values the encoder takes: ``"auto"`` and the engine's kinds (``slot_batches.BATCHES``)."""


class RGEEncoder(EncodeMethods):
    """Encodes text, images and text+image items with an RGE checkpoint.

    Queries reason first (greedy rationale ending in ``<emb>``; the embedding is the hidden state of
    ``<emb>``); documents take the candidate path (``<emb>`` appended, one forward pass).
    """

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        *,
        max_new_tokens: int = 128,
        max_length: int | None = None,
        repetition_penalty: float | None = None,
        kv_cache: KVCache = "auto",
    ) -> None:
        if kv_cache not in KV_CACHES:
            raise RGEInputError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
        from .engine.cache_pool import SlotCachePool
        from .engine.vision_attention import batch_windows

        self.checkpoint = checkpoint
        batch_windows(checkpoint.model)  # the vision tower's windows in few attention calls (same outputs)
        self.kv_cache = kv_cache
        """The query path's KV cache: "static" (``SlotCache`` with fixed-shape decode steps, replayed as CUDA
        graphs on CUDA), "preallocated" (``SlotCache``, eager steps), "dynamic" (transformers' ``DynamicCache``)
        or "auto" (static on CUDA, dynamic elsewhere)."""
        self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        self.generation_settings: GenerationSettings = _settings(checkpoint.generation, repetition_penalty)
        """How queries choose rationale tokens: the checkpoint's generation config, as the authors'
        ``generate`` call applies it, with any override given here."""
        context = int(checkpoint.model.config.text_config.max_position_embeddings)
        self.max_length = context if max_length is None else _positive_int(max_length, "max_length")
        """Longest prompt, in tokens (image tokens included, plus the reasoning budget for queries)."""
        self._tokenizer = PromptTokenizer(checkpoint.tokenizer, checkpoint.image_pad_id)
        self.inputs = InputPipeline(
            self._tokenizer, checkpoint.vision, checkpoint.template, device=self.device, dtype=self.dtype
        )
        """Prepares inputs (images decoded and resized, prompts tokenized, patches made ahead of the model) in
        worker threads; ``encode``, the query decoder and ``rge serve`` share it."""
        self._cache_pool = SlotCachePool()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: DTypeName | torch.dtype | None = None,
        attn_implementation: AttnImplementation | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_new_tokens: int = 128,
        max_length: int | None = None,
        repetition_penalty: float | None = None,
        kv_cache: KVCache = "auto",
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        show_progress_bar: bool = False,
    ) -> RGEEncoder:
        """Load a hub id (``"MCG-NJU/RGE"``, downloaded via huggingface-hub) or a local directory.

        Defaults: CUDA if available else CPU; bf16 on CUDA, fp32 on CPU; flash-attention 2 when it
        imports on CUDA, else sdpa; 256*28*28 to 1024*28*28 pixels per image (the paper's budget);
        ``max_length``: the model's context (longer inputs raise RGEInputError, nothing is truncated);
        queries decode as the checkpoint's ``generation_config.json`` says (its repetition penalty;
        ``repetition_penalty=1.0`` gives plain greedy decoding); ``kv_cache``: the query path's cache,
        ``"static"`` on CUDA (a preallocated cache, fixed-shape steps replayed as CUDA graphs) and
        transformers' dynamic one elsewhere (``"preallocated"``: the preallocated cache with eager steps;
        ``"dynamic"``).

        Options are checked before anything is downloaded or loaded (``RGEInputError``: a device this
        machine lacks, a dtype that is not floating-point, a pixel budget out of order); a model that is
        neither a local directory nor downloadable raises ``RGEModelNotFoundError`` saying why.

        Loading is quiet: transformers' "Loading weights" bar shows only with ``show_progress_bar=True`` (a
        download shows the hub's bars, unless ``HF_HUB_DISABLE_PROGRESS_BARS=1``).
        """
        resolved_device = choose_device(device)
        resolved_dtype = choose_dtype(dtype, resolved_device)
        attention = choose_attention(attn_implementation, resolved_device)
        min_pixels, max_pixels = pixel_budget(min_pixels, max_pixels)
        path = resolve_checkpoint(
            name_or_path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        checkpoint = load_checkpoint(
            path,
            device=resolved_device,
            dtype=resolved_dtype,
            attn_implementation=attention,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            show_progress_bar=show_progress_bar,
        )
        from_hub = not Path(name_or_path).expanduser().is_dir()
        checkpoint.name = str(name_or_path) if from_hub else str(path.resolve())
        checkpoint.revision = path.name if from_hub else None  # the snapshot folder is the commit
        return cls(
            checkpoint,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            repetition_penalty=repetition_penalty,
            kv_cache=kv_cache,
        )

    @property
    def model(self) -> Any:
        """The underlying ``Qwen2_5_VLForConditionalGeneration``."""
        return self.checkpoint.model

    @property
    def embedding_dim(self) -> int:
        """Length of the embedding vectors (the language model's hidden size)."""
        return int(self.model.config.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        name = self.checkpoint.name or str(self.checkpoint.path)
        return (f"{type(self).__name__}(model={name!r}, device={str(self.device)!r}, dtype={self.dtype}, "
                f"max_new_tokens={self.max_new_tokens}, kv_cache={self.kv_cache!r})")  # fmt: skip

    # What a call returns, for type checkers (the last definition is what runs): see rge/encode_methods.py.
    # fmt: off
    @overload
    def encode(  # type: ignore[overload-overlap]
        self, texts: TextInput, images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[True], convert_to_numpy: bool = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[torch.Tensor, str]: ...
    @overload
    def encode(  # type: ignore[overload-overlap]
        self, texts: TextInput, images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[False] = ..., convert_to_numpy: Literal[True] = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[np.ndarray, str]: ...
    @overload
    def encode(
        self, texts: Iterable[TextInput], images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[True], convert_to_numpy: bool = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[torch.Tensor, Rationales]: ...
    @overload
    def encode(
        self, texts: Iterable[TextInput], images: ImagesInput = ..., *, return_rationales: Literal[True],
        convert_to_tensor: Literal[False] = ..., convert_to_numpy: Literal[True] = ..., **options: Unpack[EncodeOptions]
    ) -> tuple[np.ndarray, Rationales]: ...
    @overload
    def encode(
        self, texts: EncodeInput | None = ..., images: ImagesInput = ..., *, return_rationales: Literal[False] = ...,
        convert_to_tensor: Literal[True], convert_to_numpy: bool = ..., **options: Unpack[EncodeOptions]
    ) -> torch.Tensor: ...
    @overload
    def encode(
        self, texts: EncodeInput | None = ..., images: ImagesInput = ..., *, return_rationales: Literal[False] = ...,
        convert_to_tensor: Literal[False] = ..., convert_to_numpy: Literal[True] = ..., **options: Unpack[EncodeOptions]
    ) -> np.ndarray: ...
    @overload
    def encode(
        self, texts: EncodeInput | None = ..., images: ImagesInput = ..., reason: bool = ..., batch_size: int = ...,
        normalize: bool = ..., show_progress_bar: bool | None = ..., convert_to_numpy: bool = ...,
        convert_to_tensor: bool = ..., return_rationales: bool = ..., max_new_tokens: int | None = ..., *,
        exif_transpose: bool = ..., repetition_penalty: float | None = ..., prompt: str | None = ...,
        prompt_name: PromptName | None = ...,
    ) -> EncodeResult: ...
    # fmt: on
    def encode(
        self,
        texts: EncodeInput | None = None,
        images: ImagesInput = None,
        reason: bool = True,
        batch_size: int = 16,
        normalize: bool = True,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        return_rationales: bool = False,
        max_new_tokens: int | None = None,
        *,
        exif_transpose: bool = True,
        repetition_penalty: float | None = None,
        prompt: str | None = None,
        prompt_name: PromptName | None = None,
        **unknown: Any,
    ) -> EncodeResult:
        """Embed ``texts`` with their ``images``: float32 (N, D) in input order, (D,) for a single item.

        - ``texts``: a str, a ``{"text", "image"}`` dict, or a sequence or iterable of them (``None``: the
          ``images`` alone); ``images``: one per text in a list or tuple (``None`` for none), or one image.
        - ``reason``: the query path (a rationale, then the embedding) if True, else the candidate path.
        - ``batch_size``: items run together; ``normalize``: L2-normalise; ``show_progress_bar``: a tqdm bar
          (default: when there is more than one batch).
        - ``convert_to_tensor=True`` (or ``convert_to_numpy=False``): a torch tensor instead of numpy.
        - ``return_rationales=True``: ``(embeddings, Rationales)``; for a single item, its rationale (a str).
        - ``max_new_tokens`` (the reasoning budget) and ``repetition_penalty`` override the encoder's here.
        - ``exif_transpose=False`` keeps images as stored (no EXIF rotation), as the authors' evaluation does.
        - ``prompt`` (a str) or ``prompt_name`` (a task of ``rge.prompts.TASK_PROMPTS``: ``"vqa"``,
          ``"image_retrieval"``, ...; the side is picked by ``reason``) goes before every text.
        """
        if unknown:
            raise RGEInputError(f"unknown keyword arguments: {', '.join(sorted(unknown))}")
        if not isinstance(reason, bool):
            raise RGEInputError(f"reason must be a bool, got {type(reason).__name__}")
        batch_size = _positive_int(batch_size, "batch_size")
        budget = self.max_new_tokens if max_new_tokens is None else _positive_int(max_new_tokens, "max_new_tokens")
        generation = _settings(self.generation_settings, repetition_penalty)
        try:
            prefix = resolve_prompt(prompt, prompt_name, reason)
        except ValueError as error:
            raise RGEInputError(str(error)) from None
        tokenized, single = self.inputs.prepare(
            texts, images, reason=reason, max_length=self.max_length, budget=budget,
            exif_transpose=exif_transpose, prompt=prefix,
        )  # fmt: skip
        progress = show_progress_bar if show_progress_bar is not None else len(tokenized) > batch_size
        if not tokenized:
            embeddings, rationales = torch.empty((0, self.embedding_dim)), Rationales([], [])
        elif reason:
            embeddings, rationales = self._encode_reasoning(
                tokenized, batch_size, budget, progress, generation=generation
            )
        else:
            embeddings = self.candidate_embeddings(tokenized, batch_size, progress=progress)
            rationales = Rationales([""] * len(tokenized), [[] for _ in tokenized])
        result = _convert(
            l2_normalize(embeddings) if normalize else embeddings, single, convert_to_numpy, convert_to_tensor
        )
        if return_rationales:
            return result, (rationales[0] if single else rationales)
        return result

    def prepare(
        self,
        texts: Any,
        images: Any = None,
        *,
        reason: bool,
        exif_transpose: bool = True,
        prompt: str = "",
        max_new_tokens: int | None = None,
    ) -> list[TokenizedItem]:
        """Inputs as ``encode`` takes them -> prompt token ids (query or candidate prompt), image slots expanded,
        images resized; in this thread (``encode`` spreads the work over ``inputs``' workers).

        Lower-level than ``encode`` (for engines driven directly, such as ``rge serve``): every check that
        can reject an input happens here (RGEInputError naming the item), before any model work; a query's
        prompt must leave room for ``max_new_tokens`` (default: the encoder's) within ``max_length``.
        """
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        items, _ = self.inputs.prepare(
            texts, images, reason=reason, max_length=self.max_length, budget=budget,
            exif_transpose=exif_transpose, prompt=prompt, parallel=False,
        )  # fmt: skip
        return items

    def candidate_embeddings(
        self, items: Sequence[TokenizedItem], batch_size: int, *, progress: bool = False
    ) -> torch.Tensor:
        """Raw (not normalised) float32 embeddings of prepared candidate items (``prepare(..., reason=False)``,
        indexed 0..N-1), in index order: one forward pass per length-sorted batch."""
        from .engine.candidates import embed_candidates

        return embed_candidates(
            self.model, items, self.model_batch, self.checkpoint.emb_token_id, batch_size, progress,
            prefetch=self.inputs.prefetch,
        )  # fmt: skip

    def _encode_reasoning(
        self,
        items: list[TokenizedItem],
        batch_size: int,
        budget: int,
        progress: bool,
        admission: bool = True,
        generation: GenerationSettings | None = None,
    ) -> tuple[torch.Tensor, Rationales]:
        decoder = self.query_decoder(batch_size, budget, generation=generation, admission=admission)
        result = decoder.run(items, progress)
        return result.embeddings, Rationales(self.rationale_texts(result.generated), result.generated)

    def query_decoder(
        self,
        batch_size: int,
        max_new_tokens: int | None = None,
        *,
        generation: GenerationSettings | None = None,
        admission: bool = True,
        kv_cache: KVCache | None = None,
        choice: TokenChoice = GREEDY,
    ) -> ReasoningDecoder:
        """The query path's decoder as ``encode`` configures it (its cache, budget and generation settings;
        ``kv_cache`` overrides the encoder's for this decoder, ``choice`` the arg-max).

        Lower-level than ``encode``: its ``stream()`` takes prepared items (``prepare``) as they arrive,
        which is how ``rge serve`` shares one running batch among requests.
        """
        from .engine.decoder import ReasoningDecoder
        from .engine.slot_batches import resolve_kv_cache

        config = DecodeConfig(
            emb_token_id=self.checkpoint.emb_token_id,
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            batch_size=batch_size,
            generation=generation or self.generation_settings,
            admission=admission,
        )
        return ReasoningDecoder(
            self.model,
            self.model_batch,
            config,
            kv_cache=resolve_kv_cache(kv_cache or self.kv_cache, self.device),
            choice=choice,
            prefetch=self.inputs.prefetch,
            pool=self._cache_pool,
        )

    def release_decode_cache(self) -> None:
        """Free the KV cache (and CUDA graphs) the query path keeps between calls for reuse."""
        self._cache_pool.clear()

    def rationale_texts(self, token_ids: Sequence[Sequence[int]]) -> list[str]:
        """Rationales as text from generated token ids (``<emb>`` left out)."""
        return [self._rationale_text(list(tokens)) for tokens in token_ids]

    def _rationale_text(self, tokens: list[int]) -> str:
        if tokens and tokens[-1] == self.checkpoint.emb_token_id:
            tokens = tokens[:-1]
        return self._tokenizer.decode(tokens).replace(EMB_TOKEN, "")

    def model_batch(self, rows: Sequence[TokenizedItem]) -> ModelBatch:
        """Prepared items as one left-padded batch on the model's device (pixel values in its dtype)."""
        checkpoint, device, dtype = self.checkpoint, self.device, self.dtype
        return collate(rows, checkpoint.pad_token_id, checkpoint.image_pad_id, device, dtype).to(device, dtype)


def _settings(settings: GenerationSettings, repetition_penalty: float | None) -> GenerationSettings:
    try:
        return settings.with_penalty(repetition_penalty)
    except ValueError as error:
        raise RGEInputError(str(error)) from None


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RGEInputError(f"{name} must be a positive int, got {value!r}")
    return value


def _convert(embeddings: torch.Tensor, single: bool, to_numpy: bool, to_tensor: bool) -> Embeddings:
    if single:
        embeddings = embeddings[0]
    if to_tensor or not to_numpy:
        return embeddings
    return embeddings.numpy()
