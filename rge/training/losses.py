"""RGE's joint objective: InfoNCE on self-generated-rationale query embeddings plus a language-model loss
on supervision rationales, exact across processes.

Across ``W`` processes (DDP averages gradients), each process returns the same full-batch contrastive
value (its own embeddings carry the gradient inside the gathered batch) and its share of the LM loss
(its labelled tokens over all processes' labelled tokens). ``JointLoss.for_backward`` scales their sum
by ``W``, so that DDP's average equals the gradient of one process on the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DEFAULT_TEMPERATURE
from .distributed import gather_with_grad, sum_over_processes, world_size

IGNORE_INDEX = -100


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor
    """InfoNCE over the whole (gathered) batch: the same value on every process."""
    accuracy: torch.Tensor
    """Fraction of queries whose positive scores highest (in-batch accuracy)."""


def info_nce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> ContrastiveOutput:
    """InfoNCE over cosine similarity / ``temperature``: query ``i`` against every positive and negative of
    the batch gathered across processes, its own positive being the target.

    ``queries`` and ``positives`` are this process's (n, D) embeddings, ``negatives`` its hard negatives
    (m, D) or None; they need not be normalised.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    all_queries = F.normalize(gather_with_grad(queries).float(), dim=-1)
    candidates = [gather_with_grad(positives)]
    if negatives is not None and (negatives.shape[0] or world_size() > 1):  # every process joins the gather,
        candidates.append(gather_with_grad(negatives))  # also one whose rows have no hard negative
    all_candidates = F.normalize(torch.cat(candidates).float(), dim=-1)
    logits = all_queries @ all_candidates.T / temperature
    targets = torch.arange(all_queries.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, targets)
    accuracy = (logits.argmax(dim=-1) == targets).float().mean()
    return ContrastiveOutput(loss, accuracy.detach())


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """This process's share of the mean next-token cross-entropy over all processes' labelled tokens.

    ``logits`` (B, T, V) predict the token after each position; ``labels`` (B, T) hold the token ids to
    learn at their own positions and ``IGNORE_INDEX`` elsewhere (they are shifted here). Summed over
    processes, the shares give the mean over every labelled token of the global batch. 0 when none.
    """
    total = next_token_loss_sum(logits, labels)
    return total / global_count(int((labels[:, 1:] != IGNORE_INDEX).sum()), total.device).clamp(min=1)


def next_token_loss_sum(
    states: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """The next-token cross-entropy summed over ``labels``' labelled tokens (float32; 0 when none).

    ``states`` (B, T, ...) are the logits at each position, or hidden states that ``head`` (the model's
    ``lm_head``) turns into logits: only at the labelled positions, so a pass never holds (B, T, V) logits.
    """
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    if not bool(labelled.any()):
        return states.new_zeros((), dtype=torch.float32)
    chosen = states[:, :-1][labelled]
    logits = (chosen if head is None else head(chosen)).float()
    return F.cross_entropy(logits, targets[labelled], reduction="sum")


def global_count(local: int, device: torch.device | None = None) -> torch.Tensor:
    """``local`` summed over all processes (the LM loss's denominator: labelled tokens of the global batch)."""
    return sum_over_processes(torch.tensor(local, device=device))


@dataclass
class JointLoss:
    contrastive: ContrastiveOutput
    language_model: torch.Tensor
    """This process's share of the LM loss (see ``language_model_loss``)."""
    lm_weight: float

    @property
    def for_backward(self) -> torch.Tensor:
        """What to call ``backward`` on: the process's part of the total, scaled for DDP's averaging."""
        return world_size() * (self.contrastive.loss + self.lm_weight * self.language_model)

    def logged(self) -> dict[str, float]:
        """The global batch's values (the same on every process)."""
        language_model = float(sum_over_processes(self.language_model.detach()))
        contrastive = float(self.contrastive.loss.detach())
        return {"loss": contrastive + self.lm_weight * language_model, "contrastive": contrastive,
                "lm": language_model, "accuracy": float(self.contrastive.accuracy)}  # fmt: skip


def joint_loss(contrastive: ContrastiveOutput, language_model: torch.Tensor, lm_weight: float = 1.0) -> JointLoss:
    """Total = contrastive + ``lm_weight`` x LM (the paper's objective; weight 1 by default)."""
    if lm_weight < 0:
        raise ValueError(f"lm_weight must be >= 0, got {lm_weight}")
    return JointLoss(contrastive, language_model, lm_weight)
