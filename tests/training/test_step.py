"""A training step: the contrastive branch embeds the model's own rationale exactly as the query path does
(never the supervision rationale), and cached gradients (GradCache) equal the one-pass gradient, each
micro-batch's second forward drawing the dropout of its first."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
import torch

from rge import RGEEncoder
from rge.engine.forward import build_position_ids, forward_prompts
from rge.testing import image_bytes, make_test_image
from rge.training import (
    IGNORE_INDEX,
    EmbeddingModule,
    Side,
    TrainingExample,
    backward_step,
    build_step_batch,
    collate_pass,
    language_model_loss,
)

from ..conftest import BUDGET, MAX_PIXELS, MIN_PIXELS

SUPERVISION = "zebra quokka zebra"


def _examples() -> list[TrainingExample]:
    picture = image_bytes(make_test_image(60, 40, seed=7))
    return [
        TrainingExample(Side("What is in the image?", picture), Side("a red square"), (Side("a blue circle"),),
                        SUPERVISION, "t"),
        TrainingExample(Side("cat"), Side("", image_bytes(make_test_image(30, 90, seed=8))), (), None, "t"),
        TrainingExample(Side("Which animal is on the left side?"), Side("the dog"),
                        (Side("the cow"), Side("", picture)), "the left one " + SUPERVISION, "t"),
        TrainingExample(Side("dog and tiger"), Side("two animals"), (), "two " + SUPERVISION, "t"),
    ]  # fmt: skip


def test_contrastive_branch_embeds_the_self_generated_rationale_as_the_query_path_does(encoder):
    examples = _examples()
    step = build_step_batch(encoder, examples, max_new_tokens=BUDGET)
    texts = [{"text": e.query.text, **({"image": e.query.image} if e.query.image else {})} for e in examples]
    expected, rationales = encoder.encode(texts, reason=True, return_rationales=True, show_progress_bar=False)
    prompts = encoder.prepare(texts, reason=True)
    supervision_ids = set(encoder.checkpoint.tokenizer(SUPERVISION, add_special_tokens=False)["input_ids"])
    for row, sequence in enumerate(step.queries):
        assert sequence.item.input_ids == [*prompts[row].input_ids, *rationales.token_ids[row]]
        assert sequence.labelled == 0
        generated = sequence.item.input_ids[len(prompts[row].input_ids) :]
        assert not supervision_ids <= set(generated)  # the supervision rationale is not what it embeds
    with torch.no_grad():
        (output,) = EmbeddingModule(encoder.model)([collate_pass(encoder, step.queries)])
    got = torch.nn.functional.normalize(output.embeddings, dim=-1).numpy()
    assert np.all(np.sum(got * expected, axis=1) >= 0.9999)
    # The LM branch: the prompt, then the supervision rationale and <emb>, labelled; rows without one absent.
    emb = encoder.checkpoint.emb_token_id
    assert len(step.supervision) == 3
    for sequence, row in zip(step.supervision, (0, 2, 3)):
        rationale = encoder.checkpoint.tokenizer(examples[row].rationale, add_special_tokens=False)["input_ids"]
        assert sequence.item.input_ids == [*prompts[row].input_ids, *rationale, emb]
        assert sequence.labelled == len(rationale) + 1
    # Candidates: the positives in query order, then the hard negatives; <emb> alone labelled.
    assert len(step.candidates) == 4 + 3 and all(c.labelled == 1 for c in step.candidates)
    assert step.candidates[4].item.input_ids == encoder.prepare(["a blue circle"], reason=False)[0].input_ids


def test_without_reasoning_queries_take_the_candidate_path(encoder):
    """``reasoning=False`` (``--no-reasoning``): nothing is generated; each query is its prompt + ``<emb>`` and
    embeds as ``encode(..., reason=False)`` does. The LM and candidate lists are those of a reasoning step."""
    examples = _examples()
    step = build_step_batch(encoder, examples, max_new_tokens=BUDGET, reasoning=False)
    texts = [{"text": e.query.text, **({"image": e.query.image} if e.query.image else {})} for e in examples]
    expected = encoder.encode(texts, reason=False, show_progress_bar=False)
    prompts = encoder.prepare(texts, reason=False)
    assert step.generated == [[encoder.checkpoint.emb_token_id]] * len(examples)
    assert [sequence.item.input_ids for sequence in step.queries] == [prompt.input_ids for prompt in prompts]
    assert all(sequence.labelled == 0 for sequence in step.queries)
    with torch.no_grad():
        (output,) = EmbeddingModule(encoder.model)([collate_pass(encoder, step.queries)])
    got = torch.nn.functional.normalize(output.embeddings, dim=-1).numpy()
    assert np.all(np.sum(got * expected, axis=1) >= 0.9999)
    reasoning = build_step_batch(encoder, examples, max_new_tokens=BUDGET)
    for kept in ("supervision", "candidates"):
        ours, theirs = getattr(step, kept), getattr(reasoning, kept)
        assert [(s.item.input_ids, s.labelled) for s in ours] == [(s.item.input_ids, s.labelled) for s in theirs]


@pytest.fixture
def trainable_encoder(tiny_path) -> RGEEncoder:
    encoder = RGEEncoder.from_pretrained(tiny_path, device="cpu", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    encoder.model.requires_grad_(True).train()
    return encoder


def _gradients(module, step, collate, **options):
    module.zero_grad(set_to_none=True)
    loss = backward_step(module, step, collate, temperature=0.05, lm_weight=0.7, **options)
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return loss.logged(), grads


def test_cached_gradients_equal_the_one_pass_gradient(trainable_encoder):
    encoder = trainable_encoder
    step = build_step_batch(encoder, _examples(), max_new_tokens=BUDGET, max_negatives=1)
    assert len(step.candidates) == 4 + 2  # max_negatives keeps the first of each row
    module = EmbeddingModule(encoder.model)
    collate = functools.partial(collate_pass, encoder)
    whole_loss, whole = _gradients(module, step, collate)
    cached_loss, cached = _gradients(module, step, collate, micro_batch_size=2)
    assert cached_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole.keys() == cached.keys()
    assert any("visual" in name for name in whole)  # images reached the vision tower
    for name, grad in whole.items():
        scale = grad.abs().max().clamp(min=1e-8)
        assert ((cached[name] - grad).abs().max() / scale) < 1e-4, name
    assert whole_loss["lm"] > 0 and whole_loss["contrastive"] > 0


class _Recording(EmbeddingModule):
    """The step's module, keeping the embeddings of every pass and whether it ran with a graph."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.passes: list[tuple[bool, torch.Tensor]] = []

    def forward(self, passes):
        outputs = super().forward(passes)
        self.passes += [(torch.is_grad_enabled(), output.embeddings.detach().clone()) for output in outputs]
        return outputs


@pytest.fixture
def dropout_encoder(tiny_path, tmp_path) -> RGEEncoder:
    """The tiny checkpoint with its config's ``attention_dropout`` at 0.3, trainable and in training mode."""
    path = shutil.copytree(tiny_path, tmp_path / "dropout")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config["attention_dropout"] = 0.3
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    encoder = RGEEncoder.from_pretrained(path, device="cpu", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    encoder.model.requires_grad_(True).train()
    return encoder


def test_cached_gradients_replay_each_micro_batch_with_the_dropout_of_its_first_forward(dropout_encoder):
    """The contrastive gradient is taken at the first forward's embeddings; the second forward (with its graph)
    must compute those same embeddings, so it must draw the same dropout masks. (Dropout draws in another order
    over the whole batch, so the one-pass gradient is not the reference here.)"""
    encoder = dropout_encoder
    step = build_step_batch(encoder, _examples(), max_new_tokens=BUDGET, max_negatives=1)
    module, collate = _Recording(encoder.model), functools.partial(collate_pass, encoder)
    torch.manual_seed(0)
    backward_step(module, step, collate, temperature=0.05, micro_batch_size=2)
    first = [embeddings for graph, embeddings in module.passes if not graph]
    second = [embeddings for graph, embeddings in module.passes if graph]
    assert len(first) == 2 + 3 and len(second) == 2 + len(first)  # micro-batches of queries, candidates (supervision)
    for number, (drawn, replayed) in enumerate(zip(first, second[2:])):  # the same micro-batches, in the same order
        assert torch.equal(replayed, drawn), f"micro-batch {number}: max difference {(replayed - drawn).abs().max()}"
    with torch.no_grad():  # dropout is on: the first micro-batch again, with the generator where it now is
        (again,) = module([collate(step.queries[:2])])
    assert (again.embeddings - first[0]).abs().max() > 1e-3


def test_the_passes_lm_sum_is_the_language_model_loss_over_full_logits(encoder):
    """The module computes logits only where labels are; the result is the loss over every position."""
    step = build_step_batch(encoder, _examples(), max_new_tokens=BUDGET)
    batch, labels = collate_pass(encoder, step.supervision + step.candidates)
    with torch.no_grad():
        (output,) = EmbeddingModule(encoder.model)([(batch, labels)])
        hidden = forward_prompts(encoder.model, batch, build_position_ids(encoder.model, batch))
        expected = language_model_loss(encoder.model.lm_head(hidden), labels)
    labelled = sum(sequence.labelled for sequence in step.supervision + step.candidates)
    assert labelled == int((labels[:, 1:] != IGNORE_INDEX).sum()) > len(step.candidates)
    assert output.lm_sum.item() == pytest.approx(expected.item() * labelled, rel=1e-5)
    assert torch.allclose(output.embeddings, hidden[:, -1].float())


@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_every_backward_through_the_model_takes_the_backward_hook(trainable_encoder, micro_batch_size):
    """float16 runs scale the loss before each backward (GradScaler): every gradient then carries the scale,
    in one pass and with cached gradients alike."""
    encoder = trainable_encoder
    step = build_step_batch(encoder, _examples(), max_new_tokens=BUDGET, max_negatives=1)
    module, collate = EmbeddingModule(encoder.model), functools.partial(collate_pass, encoder)
    plain_loss, plain = _gradients(module, step, collate, micro_batch_size=micro_batch_size)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled_loss, scaled = _gradients(module, step, collate, micro_batch_size=micro_batch_size,
                                     backward=lambda loss: scaler.scale(loss).backward())  # fmt: skip
    assert scaled_loss == pytest.approx(plain_loss, rel=1e-6) and scaled.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(scaled[name], grad * 1024, rtol=1e-4, atol=1e-6 * 1024, msg=name)
