"""Training on a local MMEB-train snapshot: its subsets streamed through ``datasets`` and rewritten as the authors
train, supervision rationales joined from per-subset files, an order that (seed, epoch) decides and a resumed run
continues, and clear refusals before any model is loaded."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from rge.bad_rows import BadRow
from rge.cli import main
from rge.training import DataPosition, TrainingDataError, TrainingExample, open_mmeb_train, read_training_data

from .mmeb_train_fixture import MISSING_IMAGE, build_mmeb_train_snapshot, rationale


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """``datasets``' cache (its Arrow copies of the rationale files, its locks) in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture
def snapshot(tmp_path) -> tuple[Path, Path, Path]:
    return build_mmeb_train_snapshot(tmp_path)


def _where(row: TrainingExample | BadRow) -> tuple[str, str, int]:
    """A row's subset, file and line."""
    return Path(row.file).parent.name, Path(row.file).name, row.line


def test_a_snapshot_streams_its_rows_rewritten_and_joined_with_their_rationales(snapshot, caplog):
    data, images, rationales = snapshot
    caplog.set_level(logging.WARNING, "rge.training")
    stream = open_mmeb_train(data, image_root=images, rationales=rationales, shuffle_buffer=2)
    assert stream.counts == {"HatefulMemes": 5, "ImageNet_1K": 2, "MSCOCO_t2i": 3}  # the "original" split only
    epoch = list(itertools.islice(stream.batches(DataPosition(), 2, seed=0), stream.batch_count(2)))
    assert [position for position, _ in epoch] == [DataPosition(0, number) for number in range(1, 7)]
    assert all(len({_where(row)[0] for row in batch}) == 1 for _, batch in epoch)  # one subset per batch
    rows = [row for _, batch in epoch for row in batch]
    assert sorted(_where(row)[0] for row in rows) == ["HatefulMemes"] * 6 + ["ImageNet_1K"] * 2 + ["MSCOCO_t2i"] * 4

    # The same examples as the in-memory reader of the same files (the authors' rewrites for each subset) ...
    files = sorted(data.glob("*/original-*.parquet"))
    in_memory = {(example.file, example.line): example for example in read_training_data(files, image_root=images)}
    examples = [row for row in rows if isinstance(row, TrainingExample)]
    assert {(example.file, example.line) for example in examples} == set(in_memory)
    # ... with the rationale of their subset's file, joined by query, image (and positive when the file has it)
    records = {(str(file), number): record for file in files
               for number, record in enumerate(pq.read_table(file).to_pylist(), start=1)}  # fmt: skip
    unmatched = (str(data / "HatefulMemes" / "original-00001-of-00002.parquet"), 2)
    for example in examples:
        where = (example.file, example.line)
        joined = None if example.task == "ImageNet_1K" or where == unmatched else rationale(records[where])
        assert example == replace(in_memory[where], rationale=joined)
    assert "HatefulMemes" in {example.task for example in examples if example.rationale}

    coco = str(data / "MSCOCO_t2i" / "original-00000-of-00001.parquet")
    assert [row for row in rows if isinstance(row, BadRow)] == [
        BadRow(file=coco, line=3, error=f"image path {str(images / MISSING_IMAGE)!r} does not exist")
    ]
    said = " | ".join(record.getMessage() for record in caplog.records)
    assert "HatefulMemes: 1 of 5 rows have no rationale" in said
    assert "no rationale file for ImageNet_1K" in said
    assert "MSCOCO_t2i.jsonl: records repeating an earlier record's key: 1 (the first is used)" in said


def test_rows_are_read_as_training_reaches_them(snapshot, monkeypatch):
    data, images, _ = snapshot
    read = []
    iterate = datasets.IterableDataset.__iter__

    def counted(self):
        for row in iterate(self):
            read.append(row["qry"])
            yield row

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", counted)
    stream = open_mmeb_train(data, image_root=images, shuffle_buffer=2)
    assert all(isinstance(subset.rows, datasets.IterableDataset) for subset in stream.subsets.values())
    assert read == []  # the plan counts rows from the parquet metadata
    next(stream.batches(DataPosition(), 2, seed=0))
    assert 0 < len(read) <= 4  # one subset's rows, up to the window (2) and the batch (2), of 10


@pytest.mark.parametrize("mix_tasks", [False, True])
def test_the_order_is_reproducible_and_a_resumed_stream_continues_it(snapshot, mix_tasks):
    data, images, _ = snapshot
    stream = open_mmeb_train(data, image_root=images, shuffle_buffer=3)
    per_epoch = stream.batch_count(2, mix_tasks=mix_tasks)

    def run(start: DataPosition, steps: int, seed: int = 5) -> list[tuple[DataPosition, list[tuple[str, str, int]]]]:
        batches = stream.batches(start, 2, seed=seed, mix_tasks=mix_tasks)
        return [(position, [_where(row) for row in batch]) for position, batch in itertools.islice(batches, steps)]

    whole = run(DataPosition(), 2 * per_epoch)
    assert whole[per_epoch - 1][0] == DataPosition(0, per_epoch) and whole[per_epoch][0] == DataPosition(1, 1)
    first, second = ([row for _, batch in part for row in batch] for part in (whole[:per_epoch], whole[per_epoch:]))
    assert set(first) == set(second) and len(set(first)) == 10 and first != second  # every row; a new order
    assert whole == run(DataPosition(), 2 * per_epoch) and whole != run(DataPosition(), 2 * per_epoch, seed=6)
    for done in range(1, len(whole)):  # resumed after any batch, as a checkpoint records it
        assert run(whole[done - 1][0], len(whole) - done) == whole[done:]
    assert any(len({subset for subset, _, _ in batch}) > 1 for _, batch in whole) == mix_tasks


def test_a_folder_without_a_readme_has_one_subset_per_sub_folder(tmp_path):
    data, images, _ = build_mmeb_train_snapshot(tmp_path, readme=False)
    stream = open_mmeb_train(data, image_root=images, subsets=["MSCOCO_t2i", "HatefulMemes"])
    assert stream.counts == {"MSCOCO_t2i": 3, "HatefulMemes": 5}
    with pytest.raises(TrainingDataError, match=r"MSCOCO_t2i has no split 'train'; its splits are: diverse_"):
        open_mmeb_train(data, subsets=["MSCOCO_t2i"], split="train")
    diverse = open_mmeb_train(data, image_root=images, subsets=["ImageNet_1K"], split="diverse_instruction")
    _, batch = next(diverse.batches(DataPosition(), 2, seed=0))
    assert all(isinstance(row, TrainingExample) and row.query.text.startswith("Diverse: ") for row in batch)


def test_rationale_files_it_cannot_join_are_refused(snapshot):
    data, images, rationales = snapshot
    (rationales / "HatefulMemes.json").write_text(json.dumps([{"query": "q", "rationale": "r"}]))
    with pytest.raises(TrainingDataError, match=r"HatefulMemes.json' has no \['qry', 'qry_image_path'\] field"):
        open_mmeb_train(data, image_root=images, rationales=rationales)
    (rationales / "HatefulMemes.json").write_text('[{"qry": "q", "qry_image_path": "", "rationale": ')
    with pytest.raises(TrainingDataError, match="cannot read the rationale file .*HatefulMemes.json'"):
        open_mmeb_train(data, image_root=images, rationales=rationales)
    (rationales / "HatefulMemes.jsonl").write_text("")
    with pytest.raises(TrainingDataError, match="holds both HatefulMemes.json and HatefulMemes.jsonl"):
        open_mmeb_train(data, image_root=images, rationales=rationales)


def test_misspelt_subsets_and_misplaced_options_are_refused(tiny_path, snapshot, tmp_path, capsys):
    data, _, _ = snapshot
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    base = ["train", "--model", str(tiny_path), "--device", "cpu", "--no-tensorboard", "--output", str(tmp_path / "o")]
    assert main([*base, "--data", str(data), "--subsets", "HatefulMemes", "ImageNet1K"]) == 2
    said = capsys.readouterr().err
    assert "no subset 'ImageNet1K'" in said and "its subsets are: HatefulMemes, ImageNet_1K, MSCOCO_t2i" in said
    assert main([*base, "--data", str(data), "--split", "train"]) == 2
    assert "HatefulMemes has no split 'train'; its splits are: original, diverse_instruction" in capsys.readouterr().err
    assert main([*base, "--data", str(data), str(rows)]) == 2
    assert "is a snapshot folder: give it alone" in capsys.readouterr().err
    assert main([*base, "--data", str(rows), "--subsets", "HatefulMemes"]) == 2
    assert "options of an MMEB-train snapshot folder" in capsys.readouterr().err


def test_rge_train_on_a_snapshot_resumes_to_the_uninterrupted_weights(tiny_path, snapshot, tmp_path):
    data, images, rationales = snapshot
    options = ["train", "--model", str(tiny_path), "--data", str(data), "--image-root", str(images), "--rationales",
               str(rationales), "--shuffle-buffer", "2", "--batch-size", "2", "--max-new-tokens", "2", "--max-steps",
               "6", "--learning-rate", "1e-3", "--scheduler", "constant", "--device", "cpu",
               "--no-tensorboard"]  # fmt: skip
    assert main([*options, "--output", str(tmp_path / "whole")]) == 0
    run = tmp_path / "run"
    assert main([*options, "--save-steps", "3", "--output", str(run)]) == 0
    shutil.rmtree(run / "checkpoint-6")  # as if it had died after step 6: its log and errors go past checkpoint-3
    assert main([*options, "--save-steps", "3", "--output", str(run), "--resume"]) == 0

    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(run / "model.safetensors")
    for name, tensor in whole.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name
    errors = [(tmp_path / "whole" / "errors.jsonl").read_text(), (run / "errors.jsonl").read_text()]
    assert errors[0] == errors[1]  # listed once, though the resumed run read its step again
    (listed,) = [json.loads(line) for line in errors[0].splitlines()]
    assert listed["file"] == str(data / "MSCOCO_t2i" / "original-00000-of-00001.parquet") and listed["line"] == 3
    assert listed["step"] > 3 and "missing.png" in listed["error"]
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
