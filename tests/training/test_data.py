"""Training data: rge's layout and MMEB-train's (with the authors' training-time rewrites), bad rows
reported by line, and the task-homogeneous batch plan."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rge.prompts import VISION_BLOCK
from rge.testing import make_test_image
from rge.training import Side, TrainingDataError, TrainingExample, epoch_plan, process_slice, read_training_data


def _jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_rge_layout_rows_with_images_negatives_and_rationales(tmp_path):
    make_test_image(40, 30).save(tmp_path / "cat.png")
    data = _jsonl(tmp_path / "pets.jsonl", [
        {"query": "what animal?", "query_image": "cat.png", "positive": "a cat", "rationale": "It is a cat.",
         "negatives": ["a dog", {"image": "cat.png"}, {"text": "a cow", "image": "cat.png"}], "task": "pets"},
        {"query": "find the picture", "positive_image": "cat.png"},
    ])  # fmt: skip
    first, second = read_training_data([data])
    image = str(tmp_path / "cat.png")
    assert first == TrainingExample(Side("what animal?", image), Side("a cat"),
                                    (Side("a dog"), Side("", image), Side("a cow", image)), "It is a cat.", "pets",
                                    str(data), 1)  # fmt: skip
    assert second.positive == Side("", image) and second.rationale is None and second.negatives == ()
    assert second.task == "pets"  # no task column: the file's name
    assert second.exif_transpose


def test_image_root_and_parquet(tmp_path):
    (tmp_path / "images").mkdir()
    make_test_image(40, 30).save(tmp_path / "images" / "a.png")
    table = pa.table({"query": ["q1", "q2"], "query_image": ["a.png", None], "positive": ["p1", "p2"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    rows = read_training_data([tmp_path / "rows.parquet"], image_root=tmp_path / "images")
    assert [row.query for row in rows] == [Side("q1", str(tmp_path / "images" / "a.png")), Side("q2")]


def test_hugging_face_image_structs_give_their_bytes_else_their_path(tmp_path):
    """A parquet column of ``{"bytes", "path"}`` structs, as Hugging Face datasets store images."""
    (tmp_path / "images").mkdir()
    make_test_image(40, 30).save(tmp_path / "images" / "a.png")
    png = (tmp_path / "images" / "a.png").read_bytes()
    structs = [{"bytes": png, "path": "ignored.png"}, {"bytes": None, "path": "a.png"}]
    table = pa.table({"query": ["q1", "q2"], "query_image": structs, "positive": ["p1", "p2"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    rows = read_training_data([tmp_path / "rows.parquet"], image_root=tmp_path / "images")
    assert [row.query for row in rows] == [Side("q1", png), Side("q2", str(tmp_path / "images" / "a.png"))]


def test_mmeb_train_rows_are_rewritten_per_subset_as_the_authors_train(tmp_path):
    folder = tmp_path / "HatefulMemes"
    folder.mkdir()
    make_test_image(40, 30).save(tmp_path / "meme.png")
    data = _jsonl(folder / "train.jsonl", [
        {"qry": "<|image_1|>\nRepresent the given image for binary classification to determine whether it "
                "constitutes hateful speech or not", "qry_image_path": "meme.png", "pos_text": "No",
         "pos_image_path": "", "neg_text": "['Yes']", "neg_image_path": "['']", "rationale": "Nothing hateful."},
    ])  # fmt: skip
    (row,) = read_training_data([data], image_root=tmp_path)
    assert row.task == "HatefulMemes"  # the folder names the subset, as in the hub snapshot
    # instruction_replacements.yaml (training variant), the marker removed, a trailing newline
    assert row.query == Side(
        "\nDetermine whether the given image contains hateful speech or not for binary classification\n",
        str(tmp_path / "meme.png"),
    )
    # candidate_replacements.yaml's value_map, for the positive and the negatives
    assert row.positive == Side(
        "Summarize the following statement in one word: No, it does not contain hateful speech.\n"
    )
    assert row.negatives == (Side("Summarize the following statement in one word: Yes, it contains hateful speech.\n"),)
    assert row.rationale == "Nothing hateful." and not row.exif_transpose


def test_mmeb_image_goes_first_in_the_prompt(encoder, tmp_path):
    make_test_image(60, 40).save(tmp_path / "x.png")
    data = _jsonl(tmp_path / "VisualNews_i2t.jsonl", [
        {"qry": "Find a caption for the news in the given photo <|image_1|>", "qry_image_path": "x.png",
         "pos_text": "A caption.", "pos_image_path": ""},
    ])  # fmt: skip
    (row,) = read_training_data([data], image_root=tmp_path)
    prompt = encoder.prepare([{"text": row.query.text, "image": row.query.image}], reason=True)[0]
    text = encoder.checkpoint.tokenizer.decode(prompt.input_ids)
    user = text.split("<|im_start|>user\n")[1]
    assert user.startswith("<|vision_start|><|image_pad|>") and "<|image_1|>" not in user
    assert VISION_BLOCK not in row.query.text  # placed by the prompt, first, as in the authors' training


def test_bad_rows_go_to_the_error_file_with_their_line(tmp_path):
    data = _jsonl(tmp_path / "mixed.jsonl", [
        {"query": "fine", "positive": "ok"},
        "{not json",
        {"positive": "no query"},
        {"query": "q", "positive": "p", "query_image": "missing.png"},
        {"query": "q", "positive": "p", "negatives": "not a list"},
        {"qry": "q", "pos_text": "p"},
        {"query": "q", "positive": 3},
        {"query": "q", "positive": "p", "rationale": "so <emb>"},
    ])  # fmt: skip
    rows = read_training_data([data], error_file=tmp_path / "out" / "errors.jsonl")
    assert [row.query.text for row in rows] == ["fine"]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [error["line"] for error in errors] == [2, 3, 4, 5, 6, 7, 8]
    assert all(list(error) == ["file", "line", "error"] and error["file"] == str(data) for error in errors)
    messages = [error["error"] for error in errors]
    assert "invalid JSON" in messages[0] and "'query'" in messages[1] and "missing.png" in messages[2]
    assert "'negatives' must be a list" in messages[3] and "qry_image_path" in messages[4]
    assert "'positive' must be a string" in messages[5] and "contains <emb>" in messages[6]
    with pytest.raises(TrainingDataError, match="no usable training rows"):
        read_training_data([_jsonl(tmp_path / "bad.jsonl", ["[]"])])
    with pytest.raises(TrainingDataError, match="does not exist"):
        read_training_data([tmp_path / "nope.jsonl"])


def _examples(counts: dict[str, int]) -> list[TrainingExample]:
    return [TrainingExample(Side(f"{task} {n}"), Side("p"), task=task) for task, count in counts.items()
            for n in range(count)]  # fmt: skip


def test_batches_hold_one_task_are_full_and_cover_every_example():
    examples = _examples({"a": 10, "b": 7, "c": 3})
    plan = epoch_plan(examples, 4, seed=1, epoch=0)
    assert all(len(batch) == 4 for batch in plan)
    assert all(len({examples[i].task for i in batch}) == 1 for batch in plan)
    assert set(i for batch in plan for i in batch) == set(range(20))
    assert len(plan) == 3 + 2 + 1  # each task's short batch is filled from that task
    assert plan == epoch_plan(examples, 4, seed=1, epoch=0)  # reproducible: resuming needs only the position
    assert plan != epoch_plan(examples, 4, seed=1, epoch=1)
    mixed = epoch_plan(examples, 4, seed=1, epoch=0, mix_tasks=True)
    assert len(mixed) == 5 and any(len({examples[i].task for i in batch}) > 1 for batch in mixed)


def test_processes_take_contiguous_shares_of_the_global_batch():
    batch = [7, 3, 9, 1, 4, 8]
    shares = [process_slice(batch, rank, 3) for rank in range(3)]
    assert shares == [[7, 3], [9, 1], [4, 8]]
    assert Counter(i for share in shares for i in share) == Counter(batch)
