"""Watching a run on held-out rows: ``--eval-data`` logs Recall@1, NDCG@10 (with and without reasoning) and the
rationale lengths to ``log.jsonl`` and TensorBoard, measures the weights being trained (LoRA's adapter
included) without disturbing the training, and warns when the rationales collapse to ``<emb>`` alone."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rge
from rge import RGEEncoder
from rge.training import TrainingConfig, evaluate_retrieval, read_training_data, train
from rge.training.config import EVAL_METRICS

from .conftest import document_text, synthetic_split


def _log(output: Path) -> tuple[list[dict], list[dict]]:
    """The training lines and the evaluation lines of ``log.jsonl``."""
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval/rows" in r]


def _evaluate(model: Path, data: Path) -> dict[str, float]:
    encoder = RGEEncoder.from_pretrained(model, device="cpu", max_new_tokens=4)
    return evaluate_retrieval(encoder, read_training_data([data]), batch_size=8)


def test_evaluations_are_logged_measure_the_adapter_and_leave_training_alone(
    tiny_path, synthetic_data, held_out_data, tmp_path, caplog
):
    common = {"model": str(tiny_path), "data": [str(synthetic_data)], "max_steps": 4, "batch_size": 8,
              "max_new_tokens": 4, "learning_rate": 5e-3, "lora": True, "lora_r": 4, "progress": False}  # fmt: skip
    watched = train(TrainingConfig(**common, output=str(tmp_path / "watched"), eval_data=[str(held_out_data)],
                                   eval_steps=3))  # fmt: skip
    steps, evaluations = _log(watched)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in evaluations] == [3, 4]  # every 3 steps, and the last
    assert set(evaluations[0]) == {"step", "epoch", *EVAL_METRICS, "eval/rows", "eval/seconds"}
    assert evaluations[0]["eval/rows"] == 30
    events = EventAccumulator(str(watched / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("eval/ndcg@10_reasoning")] == [3, 4]
    assert "train/loss" in events.Tags()["scalars"]
    assert not [record for record in caplog.records if "collapsed" in record.getMessage()]

    # The last evaluation measured the adapted weights: it is the saved (merged) model's, not the base model's.
    last = {name: evaluations[-1][name] for name in EVAL_METRICS}
    saved, base = _evaluate(watched, held_out_data), _evaluate(tiny_path, held_out_data)
    assert last == pytest.approx({name: saved[name] for name in EVAL_METRICS}, abs=1e-6)
    assert last != pytest.approx({name: base[name] for name in EVAL_METRICS}, abs=1e-6)

    # Evaluating (in eval mode, back to train mode after: LoRA's dropout draws on) changed nothing in training.
    plain = train(TrainingConfig(**common, output=str(tmp_path / "plain"), tensorboard=False))
    assert [r["loss"] for r in _log(plain)[0]] == [r["loss"] for r in steps]
    weights, expected = load_file(watched / "model.safetensors"), load_file(plain / "model.safetensors")
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.items())


def test_rationales_collapsing_to_emb_alone_are_warned_once_per_evaluation(tiny_path, held_out_data, tmp_path, caplog):
    # Queries that look like their candidates and no supervision rationale: the candidates' LM label (<emb>
    # right after the assistant turn opens) wins, and the model stops reasoning within two steps.
    data = tmp_path / "alike.jsonl"
    data.write_text("".join(json.dumps({"query": document_text(c), "positive": document_text(c)}) + "\n"
                            for c in synthetic_split()[0]))  # fmt: skip
    config = TrainingConfig(model=str(tiny_path), data=[str(data)], output=str(tmp_path / "out"), max_steps=4,
                            batch_size=8, max_new_tokens=4, learning_rate=1e-2, eval_data=[str(held_out_data)],
                            eval_steps=2, progress=False, tensorboard=False)  # fmt: skip
    train(config)
    _, evaluations = _log(tmp_path / "out")
    assert [r["step"] for r in evaluations] == [2, 4]
    last = evaluations[-1]
    assert last["eval/emb_only_share"] == 1 and last["eval/rationale_tokens_median"] == 0
    # A query that writes <emb> at once is embedded exactly like a candidate: reasoning adds nothing.
    assert last["eval/recall@1_reasoning"] == last["eval/recall@1_no_reasoning"]
    assert last["eval/ndcg@10_reasoning"] == pytest.approx(last["eval/ndcg@10_no_reasoning"], abs=1e-6)
    warned = [r.getMessage() for r in caplog.records if r.name == "rge.training" and "collapsed" in r.getMessage()]
    assert [message.split(":")[0] for message in warned] == ["step 2", "step 4"]
    assert "(100% of them, median 0 tokens before it)" in warned[0] and "--lm-weight" in warned[0]
    section = re.search(r'see "(.+)" in docs/training\.md', warned[0])
    docs = Path(rge.__file__).resolve().parents[1] / "docs" / "training.md"
    assert section and f"### {section[1].replace('<emb>', '`<emb>`')}\n" in docs.read_text()
    # A run without reasoning writes no rationale: its evaluation measures the same collapse, and says nothing.
    caplog.clear()
    train(dataclasses.replace(config, output=str(tmp_path / "plain"), reasoning=False))
    assert _log(tmp_path / "plain")[1][-1]["eval/emb_only_share"] == 1
    assert not [r for r in caplog.records if "collapsed" in r.getMessage()]
