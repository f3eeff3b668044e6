"""mteb 2.x: RGE as an encoder for text, image and text+image tasks (MIEB included).

>>> import mteb
>>> from rge.integrations.mteb import RGEMtebModel
>>> model = RGEMtebModel("MCG-NJU/RGE")                        # or RGEMtebModel(encoder=encoder)
>>> mteb.evaluate(model, mteb.get_tasks(tasks=["CIRRIT2IRetrieval"]))  # doctest: +SKIP

Queries (``prompt_type=query``) take the reasoning path; documents and tasks without a prompt type
(classification, clustering, STS: both sides alike) take the candidate path. Each model carries metadata
built from the checkpoint it wraps (hub id and revision, or a local directory's name and a fingerprint of
its files), so mteb's result cache never serves one checkpoint's scores for another.
``RGE_MODEL_META.load_model()`` works too, but mteb then requires its ``image`` extra (torchvision) for
every image-capable model; ``RGEMtebModel`` needs no torchvision.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import require_extra
from ._shared import resolve_encoder, side_prompts

require_extra("mteb", extra="mteb", needed_by=__name__)

import numpy as np  # noqa: E402
from mteb.models import ModelMeta  # noqa: E402
from mteb.models.abs_encoder import AbsEncoder  # noqa: E402
from mteb.models.model_meta import ScoringFunction  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from ..encoder import RGEEncoder  # noqa: E402
from ..types import PromptName  # noqa: E402


class RGEMtebModel(AbsEncoder):  # type: ignore[misc]
    """mteb's encoder protocol over an RGE encoder (given, or loaded from ``model_name``)."""

    def __init__(
        self,
        model_name: str | None = None,
        revision: str | None = None,
        *,
        encoder: RGEEncoder | None = None,
        batch_size: int = 16,
        prompt_name: PromptName | None = None,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        **load_kwargs: Any,
    ) -> None:
        if revision is not None:
            load_kwargs["revision"] = revision
        self.encoder = resolve_encoder(encoder, model_name, load_kwargs)
        self.batch_size = batch_size
        self._prompts = side_prompts(prompt_name, query_prompt, document_prompt)
        self.mteb_model_meta = model_meta(self.encoder)  # names results in mteb's cache

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed every batch of ``inputs`` (columns "text", "image" or both); one row per input."""
        reason = prompt_type == PromptType.query
        prompt = self._prompts[0] if reason else self._prompts[1]
        chunks = [
            self.encoder.encode(items, reason=reason, batch_size=self.batch_size, show_progress_bar=False, **prompt)
            for items in (_items(batch) for batch in inputs)
            if items
        ]
        if not chunks:
            return np.zeros((0, self.encoder.embedding_dim), dtype=np.float32)
        return np.concatenate(chunks)


def model_meta(encoder: RGEEncoder) -> ModelMeta:
    """``RGE_MODEL_META`` named after the checkpoint ``encoder`` wraps: its hub id and revision, or, for a
    local directory, ``local/<directory name>`` and a fingerprint of its config and weight files."""
    checkpoint = encoder.checkpoint
    if checkpoint.revision is not None:
        name, revision = checkpoint.name, checkpoint.revision
    else:
        name, revision = f"local/{checkpoint.path.resolve().name}", fingerprint(checkpoint.path)
    return RGE_MODEL_META.model_copy(update={"name": name, "revision": revision, "embed_dim": encoder.embedding_dim})


def fingerprint(path: Path, sample: int = 2**20) -> str:
    """A short digest of a checkpoint directory: config files whole, weight files by size and their first
    and last ``sample`` bytes (enough to tell checkpoints apart without reading gigabytes)."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.suffix == ".json":
            digest.update(file.name.encode() + file.read_bytes())
        elif file.suffix == ".safetensors":
            size = file.stat().st_size
            with file.open("rb") as handle:
                head = handle.read(sample)
                handle.seek(max(0, size - sample))
                digest.update(file.name.encode() + str(size).encode() + head + handle.read(sample))
    return "local-" + digest.hexdigest()[:16]


def _items(batch: dict[str, Any]) -> list[dict[str, Any]]:
    texts, images = batch.get("text"), batch.get("image")
    count = len(texts) if texts is not None else len(images) if images is not None else 0
    items = []
    for row in range(count):
        item: dict[str, Any] = {"text": texts[row] if texts is not None else ""}
        if images is not None and images[row] is not None:
            item["image"] = images[row]
        items.append(item)
    return items


RGE_MODEL_META = ModelMeta(
    loader=RGEMtebModel,  # type: ignore[arg-type]  # implements mteb's encoder protocol
    name="MCG-NJU/RGE",
    revision=None,
    release_date=None,
    languages=["eng-Latn"],
    n_parameters=None,
    memory_usage_mb=None,
    max_tokens=128000,
    embed_dim=2048,
    license=None,
    open_weights=True,
    public_training_code=None,
    public_training_data=None,
    framework=["PyTorch", "Transformers"],
    reference="https://huggingface.co/MCG-NJU/RGE",
    similarity_fn_name=ScoringFunction.COSINE,  # type: ignore[arg-type]  # mteb types its enum members as str
    use_instructions=True,
    training_datasets=None,
    modalities=["image", "text"],
    citation=(
        "Reasoning Guided Embeddings: Leveraging MLLM Reasoning for Improved Multimodal Retrieval, arXiv:2511.16150"
    ),
)
"""mteb metadata of ``MCG-NJU/RGE`` (unknown fields left None rather than guessed)."""
