"""The joint objective: values equal an independent computation, the gradient moves queries toward their
positives, and two gloo processes give the loss and gradients of one process on the concatenated batch."""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rge.training import IGNORE_INDEX, info_nce, joint_loss, language_model_loss


def test_language_model_loss_covers_exactly_the_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:6] = torch.tensor([4, 9, 1])  # a rationale and <emb>
    labels[1, 5] = 7  # a candidate: <emb> alone
    expected, count = 0.0, 0
    for row in range(2):
        for position in range(1, 6):
            if labels[row, position] != IGNORE_INDEX:  # predicted from the previous position
                scores = logits[row, position - 1].tolist()
                log_total = math.log(sum(math.exp(s) for s in scores))
                expected += log_total - scores[int(labels[row, position])]
                count += 1
    assert count == 4
    assert language_model_loss(logits, labels).item() == pytest.approx(expected / count, rel=1e-6)
    assert language_model_loss(logits, torch.full((2, 6), IGNORE_INDEX)).item() == 0.0


def test_info_nce_value_accuracy_and_gradient_direction():
    torch.manual_seed(1)
    queries = torch.randn(3, 5, requires_grad=True)
    positives, negatives = torch.randn(3, 5), torch.randn(2, 5)
    temperature = 0.05
    out = info_nce(queries, positives, negatives, temperature)
    candidates = torch.cat([positives, negatives]).tolist()
    expected, correct = 0.0, 0
    for i, query in enumerate(queries.tolist()):
        sims = [_cosine(query, c) / temperature for c in candidates]
        expected += math.log(sum(math.exp(s) for s in sims)) - sims[i]
        correct += max(range(len(sims)), key=sims.__getitem__) == i
    assert out.loss.item() == pytest.approx(expected / 3, rel=1e-5)
    assert out.accuracy.item() == pytest.approx(correct / 3)
    out.loss.backward()
    moved = queries.detach() - 0.01 * queries.grad
    before = [_cosine(q, p) for q, p in zip(queries.tolist(), positives.tolist())]
    after = [_cosine(q, p) for q, p in zip(moved.tolist(), positives.tolist())]
    assert all(a > b for a, b in zip(after, before))  # each query moves toward its own positive
    assert info_nce(moved, positives, negatives, temperature).loss < out.loss
    with pytest.raises(ValueError, match="temperature"):
        info_nce(queries, positives, temperature=0)


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# ---------------------------------------------------------------- two processes against one


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    labels = torch.full((4, 5), IGNORE_INDEX)
    labels[0, 2:] = torch.tensor([1, 2, 3])  # uneven labelled-token counts between the two halves
    labels[1, 4] = 5
    labels[2, 3:] = torch.tensor([6, 5])
    labels[3, 4] = 5
    return {"queries": torch.randn(4, 8, generator=generator), "positives": torch.randn(4, 8, generator=generator),
            "negatives": torch.randn(4, 8, generator=generator), "tokens": torch.randn(4, 5, 8, generator=generator),
            "labels": labels}  # fmt: skip


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.ModuleDict({"embed": torch.nn.Linear(8, 6), "head": torch.nn.Linear(8, 7)})


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    embed, head = model["embed"], model["head"]
    contrastive = info_nce(embed(batch["queries"]), embed(batch["positives"]), embed(batch["negatives"]), 0.1)
    loss = joint_loss(contrastive, language_model_loss(head(batch["tokens"]), batch["labels"]), lm_weight=0.5)
    loss.for_backward.backward()
    grads = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad.clone()
        if dist.is_initialized():  # what DDP does: average the gradients
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
        grads[name] = grad.flatten().tolist()
    return loss.logged(), grads


def _worker(rank: int, port: int, output: str, negatives_of_rank_0: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120)
    )  # a collective the other never joins raises
    try:
        shard = {key: value[2 * rank : 2 * rank + 2] for key, value in _batch().items()}
        split = negatives_of_rank_0  # hard negatives vary by example, so processes may hold different counts
        shard["negatives"] = _batch()["negatives"][:split] if rank == 0 else _batch()["negatives"][split:]
        logged, grads = _loss_and_grads(_model(), shard)
        with open(os.path.join(output, f"rank{rank}.json"), "w") as handle:
            json.dump({"logged": logged, "grads": grads}, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("negatives_of_rank_0", [2, 3])
def test_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path, negatives_of_rank_0):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = mp.start_processes(_worker, args=(port, str(tmp_path), negatives_of_rank_0), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not processes.join(timeout=1):  # raises when a process failed (its traceback in the message)
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            stuck = [rank for rank, process in enumerate(processes.processes) if process.exitcode is None]
            pytest.fail(f"gloo processes {stuck} did not finish within 300 s (killed)", pytrace=False)
    single_logged, single_grads = _loss_and_grads(_model(), _batch())
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, value in single_logged.items():
            assert got["logged"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (rank, key)
        for name, grad in single_grads.items():
            assert torch.allclose(torch.tensor(got["grads"][name]), torch.tensor(grad), atol=1e-6), (rank, name)


def test_training_sequences_label_exactly_the_rationale_and_emb(encoder):
    from rge.training.collation import candidate_sequence, collate_training, query_sequence

    checkpoint, emb = encoder.checkpoint, encoder.checkpoint.emb_token_id
    prompts = encoder.prepare(["What is shown?", "a much longer question about the picture"], reason=True)
    rationale = checkpoint.tokenizer("It shows a cat.", add_special_tokens=False)["input_ids"]
    sequences = [query_sequence(prompts[0], rationale, emb), query_sequence(prompts[1], [], emb),
                 candidate_sequence(encoder.prepare(["a cat"], reason=False)[0], emb)]  # fmt: skip
    batch, labels = collate_training(sequences, checkpoint.pad_token_id, checkpoint.image_pad_id)
    assert labels[0][labels[0] != IGNORE_INDEX].tolist() == [*rationale, emb]
    assert labels[1][labels[1] != IGNORE_INDEX].tolist() == [emb]  # no rationale: <emb> alone
    assert labels[2][labels[2] != IGNORE_INDEX].tolist() == [emb]
    # The sequence is the prompt the query path uses, then the rationale and <emb>, with no <|im_end|>.
    row = batch.input_ids[0][batch.attention_mask[0] == 1].tolist()
    assert row == [*prompts[0].input_ids, *rationale, emb]
    im_end = checkpoint.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert row[len(prompts[0].input_ids) :].count(im_end) == 0
    with pytest.raises(ValueError, match="must not contain <emb>"):
        query_sequence(prompts[0], [emb], emb)
