"""One step of RGE's joint objective: self-generated rationales, three passes, and the backward.

A step's examples become three lists of sequences (``StepBatch``):
- **queries**: each query prompt followed by the rationale the model generates for it now (greedy, as
  the query path decodes, with the model in eval mode and no gradient); their last hidden state is the
  query embedding of the contrastive branch;
- **candidates**: positives then hard negatives on the candidate path (prompt + ``<emb>``); the state at
  ``<emb>`` is the candidate embedding and ``<emb>`` is their LM label;
- **supervision**: each query prompt followed by its supervision rationale and ``<emb>``, all labelled,
  for the LM branch only. The supervision rationale never reaches the contrastive branch.

``backward_step`` runs them through ``EmbeddingModule`` (one call per forward, so DDP can wrap it) and
back-propagates the joint loss: in one go, or, with ``micro_batch_size``, with cached gradients
(GradCache): embeddings of the whole batch first without a graph, the contrastive loss and its gradient
with respect to them, then each micro-batch again with its graph, so the contrastive batch stays whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..bad_rows import BadRow
from ..encoder import RGEEncoder
from ..engine.batching import ModelBatch, TokenizedItem
from ..engine.forward import build_position_ids, forward_prompts
from ..errors import RGEInputError
from ..types import KVCache
from .collation import TrainingSequence, candidate_sequence, collate_training, query_sequence, unlabelled_sequence
from .config import DEFAULT_TEMPERATURE
from .data import Side, TrainingDataError, TrainingExample
from .distributed import max_over_processes, world_size
from .losses import JointLoss, global_count, info_nce, joint_loss, next_token_loss_sum
from .random_state import RandomState

Pass = tuple[ModelBatch, torch.Tensor]
"""One forward over a collated batch: its model inputs and LM labels (``IGNORE_INDEX`` where unlabelled)."""


@dataclass
class PassOutput:
    embeddings: torch.Tensor
    """(B, D) float32: the final-norm hidden state at each row's last token."""
    lm_sum: torch.Tensor
    """Summed next-token cross-entropy over the pass's labelled tokens (0 when none)."""


class EmbeddingModule(torch.nn.Module):
    """The model as one module whose forward runs a step's passes, for DDP to wrap."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, passes: Sequence[Pass]) -> list[PassOutput]:
        return [self._run(batch, labels) for batch, labels in passes]

    def _run(self, batch: ModelBatch, labels: torch.Tensor) -> PassOutput:
        hidden = forward_prompts(self.model, batch, build_position_ids(self.model, batch))
        return PassOutput(hidden[:, -1].float(), next_token_loss_sum(hidden, labels, self.model.lm_head))


@dataclass
class StepBatch:
    """A step's sequences (see the module docstring) and what the contrastive branch needs to know."""

    queries: list[TrainingSequence]
    candidates: list[TrainingSequence]
    """Positives (one per query, in query order) then hard negatives."""
    supervision: list[TrainingSequence]
    generated: list[list[int]]
    """Each query's self-generated token ids (``<emb>`` included when emitted)."""
    skipped: list[BadRow] = field(default_factory=list)
    """Examples left out of the step, and why."""

    @property
    def positives(self) -> int:
        return len(self.queries)


def build_step_batch(
    encoder: RGEEncoder,
    examples: Sequence[TrainingExample],
    *,
    max_new_tokens: int,
    max_negatives: int | None = None,
    reasoning: bool = True,
) -> StepBatch:
    """Prompts for ``examples``, the rationales the model generates for them now, and the three lists.
    Without ``reasoning`` nothing is generated: each query is its prompt + ``<emb>``, the candidate path.

    An example that cannot be prepared (an unreadable image, a prompt over ``max_length``) is left out
    of the step and listed in ``StepBatch.skipped``; TrainingDataError when none is left.
    """
    prepared, skipped = [], []
    for example in examples:
        try:
            prepared.append(_prepare_example(encoder, example, max_negatives))
        except TrainingDataError as error:
            skipped.append(BadRow(file=example.file, line=example.line, error=str(error)))
    if not prepared:
        raise TrainingDataError(f"no example of the batch could be prepared: {skipped[0].error}")
    prompts = [example.query for example in prepared]
    if reasoning:
        generated = self_generated_rationales(encoder, prompts, max_new_tokens)
    else:  # <emb> alone after the prompt: the query embeds as a candidate does
        generated = [[encoder.checkpoint.emb_token_id] for _ in prompts]
    queries = [
        unlabelled_sequence(TokenizedItem(row, [*prompt.input_ids, *tokens], prompt.image))
        for row, (prompt, tokens) in enumerate(zip(prompts, generated))
    ]
    candidates = [example.positive for example in prepared]
    candidates += [negative for example in prepared for negative in example.negatives]
    supervision = [example.supervision for example in prepared if example.supervision is not None]
    return StepBatch(queries, candidates, supervision, generated, skipped)


@dataclass
class _PreparedExample:
    query: TokenizedItem
    positive: TrainingSequence
    negatives: list[TrainingSequence]
    supervision: TrainingSequence | None


def _prepare_example(encoder: RGEEncoder, example: TrainingExample, max_negatives: int | None) -> _PreparedExample:
    emb = encoder.checkpoint.emb_token_id
    query = _prepare(encoder, example.query, example, reason=True)
    candidates = [
        candidate_sequence(_prepare(encoder, side, example, reason=False), emb)
        for side in (example.positive, *example.negatives[:max_negatives])
    ]
    supervision = None
    if example.rationale is not None:
        rationale = encoder.checkpoint.tokenizer(example.rationale, add_special_tokens=False)["input_ids"]
        supervision = query_sequence(query, rationale, emb)
        if len(supervision.item) > encoder.max_length:
            raise TrainingDataError(f"{example.source}: prompt and rationale are {len(supervision.item)} tokens, "
                                    f"over max_length={encoder.max_length}")  # fmt: skip
    return _PreparedExample(query, candidates[0], candidates[1:], supervision)


def self_generated_rationales(
    encoder: RGEEncoder, prompts: Sequence[TokenizedItem], max_new_tokens: int
) -> list[list[int]]:
    """The rationales the query path generates for ``prompts`` now: eval mode (no dropout), no gradient."""
    model = encoder.model
    was_training = model.training
    model.eval()
    try:
        # Eager steps: graphs captured for one short batch per training step would not pay for themselves.
        eager: KVCache | None = "preallocated" if encoder.device.type == "cuda" else None
        decoder = encoder.query_decoder(batch_size=len(prompts), max_new_tokens=max_new_tokens, kv_cache=eager)
        indexed = [replace(prompt, index=row) for row, prompt in enumerate(prompts)]
        return decoder.run(indexed).generated
    finally:
        model.train(was_training)


def _prepare(encoder: RGEEncoder, side: Side, example: TrainingExample, *, reason: bool) -> TokenizedItem:
    item = {"text": side.text} if side.image is None else {"text": side.text, "image": side.image}
    try:
        return encoder.prepare([item], reason=reason, exif_transpose=example.exif_transpose)[0]
    except RGEInputError as error:  # name the row, not the position in this call
        raise TrainingDataError(f"{example.source}: {error.reason}") from error


def collate_pass(encoder: RGEEncoder, sequences: Sequence[TrainingSequence]) -> Pass:
    """``sequences`` as one left-padded pass on the encoder's device (``functools.partial`` it for
    ``backward_step``)."""
    checkpoint = encoder.checkpoint
    batch, labels = collate_training(sequences, checkpoint.pad_token_id, checkpoint.image_pad_id)
    return batch.to(encoder.device, encoder.dtype), labels.to(encoder.device)


def backward_step(
    module: torch.nn.Module,
    step: StepBatch,
    collate: Callable[[Sequence[TrainingSequence]], Pass],
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    lm_weight: float = 1.0,
    micro_batch_size: int | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    uniform_passes: bool = False,
) -> JointLoss:
    """Back-propagate the step's joint loss into ``module``'s parameters; returns the loss for logging.

    ``collate`` turns sequences into a pass on the model's device. ``micro_batch_size`` (None: the whole
    batch at once) bounds the rows of one forward with a graph; ``no_sync`` (DDP's) defers the gradient
    all-reduce to the last micro-batch. ``backward`` runs each backward through the model (float16 runs
    pass ``lambda loss: scaler.scale(loss).backward()``). ``uniform_passes`` (sharded models, whose every
    forward gathers weights with the other processes) makes every process run as many passes as the
    others: a process short of a pass runs one of its queries in its place, weighted zero.
    """
    device = next(module.parameters()).device
    count = global_count(sum(sequence.labelled for sequence in step.candidates + step.supervision), device)
    largest = max(len(step.queries), len(step.candidates), len(step.supervision))
    if micro_batch_size is not None and uniform_passes:
        largest = max_over_processes([largest], device)[0]
    if micro_batch_size is None or micro_batch_size >= largest:
        lm_sum, queries, candidates = _forward_all(module, step, collate, uniform_passes)
        lm = lm_sum / count.clamp(min=1)
        loss = joint_loss(_contrastive(queries, candidates, step, temperature), lm, lm_weight)
        backward(loss.for_backward)
        return loss
    chunks = _chunks(step, micro_batch_size, device if uniform_passes else None)
    return _cached_backward(module, step, collate, temperature, lm_weight, chunks, micro_batch_size, count, no_sync,
                            backward)  # fmt: skip


def _forward_all(
    module: torch.nn.Module, step: StepBatch, collate: Callable[[Sequence[TrainingSequence]], Pass], uniform: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over all three lists: the summed LM loss, the query and the candidate embeddings."""
    stand_in = uniform and not step.supervision
    parts = [step.queries[:1] if stand_in else step.supervision, step.queries, step.candidates]
    outputs = module([collate(part) for part in parts if part])
    # A stand-in stays in the graph, weighted zero, so that its backward gathers and reduces like the others'
    # supervision pass.
    stand_in_term = outputs.pop(0).embeddings.sum() * 0 if stand_in else 0
    lm_sum = torch.stack([output.lm_sum for output in outputs]).sum() + stand_in_term
    return lm_sum, outputs[-2].embeddings, outputs[-1].embeddings


@dataclass(frozen=True)
class _Chunk:
    """A micro-batch of the cached backward: the ``part``-th ``size`` rows of list ``name``."""

    name: str
    part: int
    sequences: Sequence[TrainingSequence]
    stand_in: bool = False
    """A query run in place of a micro-batch another process has and this one lacks (weighted zero)."""


def _chunks(step: StepBatch, size: int, device: torch.device | None) -> list[_Chunk]:
    """The micro-batches of each list, the candidates last (their last one syncs the gradients); with
    ``device``, as many of each as the process with the most has (stand-ins make up the difference)."""
    lists = (("supervision", step.supervision), ("queries", step.queries), ("candidates", step.candidates))
    counts = [-(-len(part) // size) for _, part in lists]
    if device is not None:
        counts = max_over_processes(counts, device)
    chunks = []
    for (name, part), count in zip(lists, counts):
        for number in range(count):
            sequences = part[number * size : (number + 1) * size]
            chunks.append(_Chunk(name, number, sequences or step.queries[:1], stand_in=not sequences))
    return chunks


def _contrastive(queries: torch.Tensor, candidates: torch.Tensor, step: StepBatch, temperature: float) -> Any:
    return info_nce(queries, candidates[: step.positives], candidates[step.positives :], temperature)


def _cached_backward(
    module: torch.nn.Module,
    step: StepBatch,
    collate: Callable[[Sequence[TrainingSequence]], Pass],
    temperature: float,
    lm_weight: float,
    chunks: list[_Chunk],
    size: int,
    count: torch.Tensor,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]],
    backward: Callable[[torch.Tensor], None],
) -> JointLoss:
    """GradCache: the same gradient as ``_forward_all`` + backward, with one micro-batch per graph."""
    states: list[RandomState | None] = []
    embeddings: dict[str, list[torch.Tensor]] = {"queries": [], "candidates": []}
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandomState.capture() if chunk.name in embeddings else None)
            if chunk.name in embeddings:  # the LM branch needs no first pass
                output = module([collate(chunk.sequences)])[0].embeddings
                if not chunk.stand_in:
                    embeddings[chunk.name].append(output)
    after = RandomState.capture()
    queries = torch.cat(embeddings["queries"]).requires_grad_()
    candidates = torch.cat(embeddings["candidates"]).requires_grad_()
    contrastive = _contrastive(queries, candidates, step, temperature)
    (world_size() * contrastive.loss).backward()
    assert queries.grad is not None and candidates.grad is not None
    grads = {"queries": queries.grad.split(size), "candidates": candidates.grad.split(size)}
    lm_total = torch.zeros((), device=queries.device)
    for number, (chunk, state) in enumerate(zip(chunks, states)):
        if state is not None:
            state.restore()
        with no_sync() if number < len(chunks) - 1 else contextlib.nullcontext():
            output = module([collate(chunk.sequences)])[0]
            if chunk.stand_in:  # in the graph, so that its backward gathers and reduces like the others'
                backward(output.embeddings.sum() * 0)  # (its lm_sum is a constant 0: a query has no label)
                continue
            surrogate = world_size() * lm_weight * output.lm_sum / count.clamp(min=1)
            if chunk.name in grads:
                surrogate = surrogate + (output.embeddings * grads[chunk.name][chunk.part]).sum()
            backward(surrogate)
        lm_total = lm_total + output.lm_sum.detach()
    after.restore()
    return joint_loss(contrastive, lm_total / count.clamp(min=1), lm_weight)
