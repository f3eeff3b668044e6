"""`rge encode`: streaming, bad rows reported, crash-safe resume, same result on Ray as locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rge.corpus
from rge import load_embeddings
from rge.cli import main
from rge.cli.errors import EXIT_ROWS_FAILED
from rge.corpus import RGEJobError, encode_corpus
from rge.testing import make_test_image

from .conftest import MAX_PIXELS, MIN_PIXELS, file_modes
from .processes import kill_session, start


def _write_corpus(folder: Path, count: int = 23) -> Path:
    """JSONL with text rows, relative and absolute image paths, and five kinds of bad row."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for seed in range(3):
        make_test_image(50 + 20 * seed, 40, seed=seed).save(folder / "img" / f"{seed}.png")
    (folder / "img" / "broken.png").write_bytes(b"not a png")
    lines = []
    for i in range(count):
        row = {"id": f"doc-{i}", "text": f"document {i} about {'cats' if i % 2 else 'the red car by the river'}"}
        if i % 4 == 1:
            row["image"] = f"img/{i % 3}.png"
        if i % 7 == 3:
            row["image"] = str((folder / "img" / "2.png").resolve())
        lines.append(json.dumps(row))
    bad = {
        5: json.dumps({"id": "doc-5", "text": "x", "image": "img/missing.png"}),
        9: "{broken json",
        12: json.dumps({"id": "doc-12", "text": 42}),
        15: json.dumps({"text": "no id"}),
        18: json.dumps({"id": "doc-18", "text": "y", "image": "img/broken.png"}),
    }
    lines = [bad.get(i, line) for i, line in enumerate(lines)]
    lines.insert(4, "")  # blank lines are not rows
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(corpus: Path, output: Path, tiny_path: Path, *extra: str) -> list[str]:
    return ["encode", str(corpus), "--model", str(tiny_path), "--output", str(output), "--device", "cpu",
            "--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS), "--batch-size", "3",
            "--shard-size", "5", *extra]  # fmt: skip


def _expected(encoder, corpus: Path, reason: bool):
    rows = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip() and line != "{broken json"]
    good = [r for r in rows if "id" in r and isinstance(r.get("text"), str) and "missing" not in r.get("image", "")
            and "broken" not in r.get("image", "")]  # fmt: skip
    items = [{"text": r["text"], **({"image": corpus.parent / r["image"]} if "image" in r else {})} for r in good]
    vectors, rationales = encoder.encode(items, reason=reason, return_rationales=True)
    return vectors, [r["id"] for r in good], list(rationales)


def test_encode_reports_bad_rows_and_keeps_input_order(encoder, tiny_path, tmp_path, capsys):
    corpus = _write_corpus(tmp_path)
    code = main(_args(corpus, tmp_path / "index", tiny_path))
    assert code == EXIT_ROWS_FAILED
    vectors, ids = load_embeddings(tmp_path / "index", return_ids=True)
    expected, expected_ids, _ = _expected(encoder, corpus, reason=False)
    assert ids == expected_ids and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    errors = [json.loads(line) for line in (tmp_path / "index" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["id"]) for e in errors] == [
        (7, "doc-5"), (11, None), (14, "doc-12"), (17, None), (20, "doc-18")
    ]  # fmt: skip
    assert all(list(e) == ["position", "line", "id", "error"] for e in errors)
    messages = " | ".join(e["error"] for e in errors)
    expected_messages = ["image file not found", "invalid JSON", "'text' must be a string", "missing or invalid 'id'"]
    for expected_message in [*expected_messages, "cannot be decoded"]:
        assert expected_message in messages
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["encoded"] == 18 and manifest["failed"] == 5 and manifest["rows"] == 23
    assert "5 rows failed" in capsys.readouterr().err


def test_query_side_stores_rationales_and_loads_them_back(encoder, tiny_path, tmp_path):
    corpus = _write_corpus(tmp_path, count=8)
    main(_args(corpus, tmp_path / "q", tiny_path, "--side", "query", "--max-new-tokens", "6"))
    vectors, ids, rationales = load_embeddings(tmp_path / "q", return_ids=True, return_rationales=True)
    encoder_budget = encoder.max_new_tokens
    try:
        encoder.max_new_tokens = 6
        expected, expected_ids, expected_rationales = _expected(encoder, corpus, reason=True)
    finally:
        encoder.max_new_tokens = encoder_budget
    assert ids == expected_ids and rationales == expected_rationales and any(rationales)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    only_rationales = load_embeddings(tmp_path / "q", return_rationales=True)[1]
    assert only_rationales == expected_rationales

    main(_args(corpus, tmp_path / "d", tiny_path))  # documents take the candidate path: "" as encode gives
    documents, document_rationales = load_embeddings(tmp_path / "d", return_rationales=True)
    assert document_rationales == [""] * len(documents) == [""] * len(expected_ids)


def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_path, tmp_path):
    corpus = _write_corpus(tmp_path, count=60)
    args = _args(corpus, tmp_path / "killed", tiny_path, "--side", "query", "--max-new-tokens", "16",
                 "--shard-size", "4", "--batch-size", "2")  # fmt: skip
    log = tmp_path / "encode.log"
    with log.open("w") as sink:
        process = start([sys.executable, "-m", "rge.cli", *args], stdout=subprocess.DEVNULL, stderr=sink)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed").glob("shard-00001.*")):
        if process.poll() is not None or time.monotonic() > deadline:
            kill_session(process)
            why = f"it ended with {process.returncode}" if process.poll() is not None else "within 120 s"
            pytest.fail(f"rge encode wrote no second shard ({why}):\n{log.read_text()[-2000:]}", pytrace=False)
        time.sleep(0.01)
    kill_session(process)  # kill -9
    process.wait()
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert not manifest["complete"], "the run finished before it could be killed; the test proves nothing"
    survivors = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed").glob("shard-*")}
    assert survivors

    assert main(args) == EXIT_ROWS_FAILED
    for name, mtime in survivors.items():  # finished shards were kept, not recomputed
        assert (tmp_path / "killed" / name).stat().st_mtime_ns == mtime
    assert main([*args[:5], str(tmp_path / "clean"), *args[6:]]) == EXIT_ROWS_FAILED
    resumed, resumed_ids = load_embeddings(tmp_path / "killed", return_ids=True)
    clean, clean_ids = load_embeddings(tmp_path / "clean", return_ids=True)
    assert resumed_ids == clean_ids and len(set(clean_ids)) == len(clean_ids)
    np.testing.assert_array_equal(resumed, clean)
    assert (tmp_path / "killed" / "errors.jsonl").read_text() == (tmp_path / "clean" / "errors.jsonl").read_text()


def test_corrupt_and_partial_shards_are_rewritten(tiny_path, tmp_path):
    corpus = _write_corpus(tmp_path)
    output = tmp_path / "index"
    main(_args(corpus, output, tiny_path))
    clean, clean_ids = load_embeddings(output, return_ids=True)
    (output / "shard-00001.safetensors").write_bytes((output / "shard-00001.safetensors").read_bytes()[:100])
    (output / "shard-00002.safetensors").write_bytes((output / "shard-00000.safetensors").read_bytes())
    (output / ".shard-00003.safetensors.tmp-999").write_bytes(b"partial")
    (output / "shard-00004.safetensors").unlink()
    assert main(_args(corpus, output, tiny_path)) == EXIT_ROWS_FAILED
    again, again_ids = load_embeddings(output, return_ids=True)
    assert again_ids == clean_ids
    np.testing.assert_array_equal(again, clean)
    assert not list(output.glob(".*tmp*"))


def test_other_settings_are_refused(tiny_path, tmp_path, capsys):
    corpus = _write_corpus(tmp_path, count=6)
    main(_args(corpus, tmp_path / "index", tiny_path))
    assert main(_args(corpus, tmp_path / "index", tiny_path, "--side", "query")) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "'side': ('document', 'query')" in error
    assert main(_args(corpus, tmp_path / "index", tiny_path)) == EXIT_ROWS_FAILED  # same settings: fine


def test_query_decoding_settings_are_recorded_and_kept(tiny_path, tmp_path, capsys):
    corpus = _write_corpus(tmp_path, count=4)
    query = ("--side", "query", "--max-new-tokens", "4")
    main(_args(corpus, tmp_path / "q", tiny_path, *query))
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["generation"]["repetition_penalty"] == 1.05 and manifest["generation"]["top_k"] == 1
    assert main(_args(corpus, tmp_path / "q", tiny_path, *query, "--repetition-penalty", "1.0")) == 2
    assert "repetition_penalty" in capsys.readouterr().err
    main(_args(corpus, tmp_path / "plain", tiny_path, *query, "--repetition-penalty", "1.0"))
    plain = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert plain["generation"]["repetition_penalty"] == 1.0


def test_empty_input_is_refused(tiny_path, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(_args(tmp_path / "empty.jsonl", tmp_path / "index", tiny_path)) == 2
    assert "has no rows to encode" in capsys.readouterr().err


def test_unfinished_or_foreign_outputs_do_not_load(tmp_path):
    with pytest.raises(RGEJobError, match="not an rge encode output"):
        load_embeddings(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(RGEJobError, match="unfinished"):
        load_embeddings(tmp_path)


def test_parquet_input_equals_jsonl(tiny_path, tmp_path):
    rows = [{"id": f"r{i}", "text": f"row {i}", "image": "img/0.png" if i % 3 == 0 else None} for i in range(11)]
    (tmp_path / "img").mkdir()
    make_test_image(60, 40, seed=0).save(tmp_path / "img" / "0.png")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v}) + "\n" for r in rows))
    assert main(_args(tmp_path / "corpus.parquet", tmp_path / "p", tiny_path)) == 0
    assert main(_args(tmp_path / "corpus.jsonl", tmp_path / "j", tiny_path)) == 0
    np.testing.assert_array_equal(load_embeddings(tmp_path / "p"), load_embeddings(tmp_path / "j"))


def test_input_is_streamed(tmp_path):
    """The first row comes back while the rest of the input is not even written yet (a pipe held open):
    a reader that took in the whole file first could not return before the writer finished."""
    from rge.corpus import read_corpus

    pipe = tmp_path / "corpus.jsonl"
    os.mkfifo(pipe)
    first_read, writer_done = threading.Event(), threading.Event()

    def write() -> None:
        with pipe.open("w") as handle:
            handle.write('{"id": 0, "text": "row"}\n')
            handle.flush()
            first_read.wait(timeout=60)
            handle.writelines(f'{{"id": {i}, "text": "row"}}\n' for i in range(1, 1000))
        writer_done.set()

    writer = threading.Thread(target=write)
    writer.start()
    rows = read_corpus(pipe)
    first = next(rows)
    finished_before_first = writer_done.is_set()
    first_read.set()
    rest = list(rows)
    writer.join()
    assert first.id == "0" and not finished_before_first
    assert len(rest) == 999 and rest[-1].id == "999"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_path_equals_local_path(ray_cluster, tiny_path, tmp_path):
    corpus = _write_corpus(tmp_path)
    assert main(_args(corpus, tmp_path / "local", tiny_path)) == EXIT_ROWS_FAILED
    assert main(_args(corpus, tmp_path / "ray", tiny_path, "--ray", "--workers", "2")) == EXIT_ROWS_FAILED
    local, local_ids = load_embeddings(tmp_path / "local", return_ids=True)
    distributed, distributed_ids = load_embeddings(tmp_path / "ray", return_ids=True)
    assert distributed_ids == local_ids
    np.testing.assert_allclose(distributed, local, atol=1e-5)
    assert (tmp_path / "ray" / "errors.jsonl").read_text() == (tmp_path / "local" / "errors.jsonl").read_text()


def test_ray_batch_encoder_in_map_batches(ray_cluster, encoder, tiny_path):
    from rge.integrations.ray import RGEBatchEncoder

    image = make_test_image(50, 50, seed=3)
    rows = [{"text": "what is in the image?", "image": _png(image)}, {"text": "cat", "image": b""}]
    dataset = ray_cluster.data.from_items(rows).map_batches(
        RGEBatchEncoder,
        fn_constructor_kwargs={"model": str(tiny_path), "side": "query", "device": "cpu", "min_pixels": MIN_PIXELS,
                               "max_pixels": MAX_PIXELS, "max_new_tokens": encoder.max_new_tokens},
        compute=ray_cluster.data.ActorPoolStrategy(size=1),
        batch_size=2,
    )  # fmt: skip
    out = dataset.take_all()
    expected, rationales = encoder.encode_query([{"text": "what is in the image?", "image": image}, "cat"],
                                                return_rationales=True)  # fmt: skip
    np.testing.assert_allclose(np.stack([row["embedding"] for row in out]), expected, atol=1e-5)
    assert [row["rationale"] for row in out] == list(rationales)


def _png(image) -> bytes:
    from rge.testing import image_bytes

    return image_bytes(image)


def test_fields_are_mapped_and_image_bytes_are_read(tiny_path, tmp_path, capsys):
    """Other key names via --id-field/--text-field/--image-field (and a key left out with --ignore-fields),
    image bytes (plain or as datasets store them) in parquet: the same vectors as the plain JSONL."""
    corpus = _write_corpus(tmp_path, count=8)
    assert main(_args(corpus, tmp_path / "plain", tiny_path)) in (0, EXIT_ROWS_FAILED)
    expected, expected_ids = load_embeddings(tmp_path / "plain", return_ids=True)
    renamed = tmp_path / "renamed.jsonl"
    rows = []
    for line in corpus.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            rows.append(line)
            continue
        mapping = {"id": "doc_id", "text": "body", "image": "picture"}
        rows.append(json.dumps({**{mapping[k]: v for k, v in row.items()}, "source": "web"}))
    renamed.write_text("\n".join(rows) + "\n")
    fields = ("--id-field", "doc_id", "--text-field", "body", "--image-field", "picture", "--ignore-fields", "source")
    assert main(_args(renamed, tmp_path / "mapped", tiny_path, *fields)) == EXIT_ROWS_FAILED
    mapped, mapped_ids = load_embeddings(tmp_path / "mapped", return_ids=True)
    assert mapped_ids == expected_ids
    np.testing.assert_array_equal(mapped, expected)
    assert main(_args(renamed, tmp_path / "mapped", tiny_path)) == 2  # another mapping: refused
    assert "'fields'" in capsys.readouterr().err

    good = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip() and line[0] == "{"]
    good = [r for r in good if "id" in r and isinstance(r.get("text"), str) and "missing" not in r.get("image", "")
            and "broken" not in r.get("image", "")]  # fmt: skip
    images = [(corpus.parent / r["image"]).read_bytes() if "image" in r else None for r in good]
    for name, column in (
        ("bytes", images),
        ("struct", [None if b is None else {"bytes": b, "path": None} for b in images]),
    ):
        table = pa.table({"id": [r["id"] for r in good], "text": [r["text"] for r in good], "image": column})
        pq.write_table(table, tmp_path / f"{name}.parquet")
        assert main(_args(tmp_path / f"{name}.parquet", tmp_path / name, tiny_path)) == 0
        got, got_ids = load_embeddings(tmp_path / name, return_ids=True)
        assert got_ids == [r["id"] for r in good]
        np.testing.assert_allclose(got, expected[[expected_ids.index(i) for i in got_ids]], atol=1e-6)


def test_duplicate_ids_are_reported(tiny_path, tmp_path):
    corpus = tmp_path / "dup.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": i % 3, "text": f"row {i}"}) for i in range(5)) + "\n")
    assert main(_args(corpus, tmp_path / "index", tiny_path)) == EXIT_ROWS_FAILED
    errors = [json.loads(line) for line in (tmp_path / "index" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["id"]) for e in errors] == [(4, "0"), (5, "1")]
    assert all("duplicate id" in e["error"] and "first at line" in e["error"] for e in errors)
    assert load_embeddings(tmp_path / "index", return_ids=True)[1] == ["0", "1", "2"]


def test_parquet_without_the_mapped_columns_is_refused_up_front(tiny_path, tmp_path, capsys):
    pq.write_table(pa.table({"key": ["a"], "body": ["text"]}), tmp_path / "c.parquet")
    assert main(_args(tmp_path / "c.parquet", tmp_path / "index", tiny_path)) == 2
    assert "no column 'id'" in capsys.readouterr().err and not (tmp_path / "index").exists()


def test_keys_no_field_maps_are_refused_before_the_model_loads(tiny_path, tmp_path, capsys, monkeypatch):
    """A misspelled field ("img") would drop every image: refused with status 2 before loading or writing
    anything, naming the key and the options; mapped (--image-field) or left out (--ignore-fields), it runs."""
    (tmp_path / "img").mkdir()
    make_test_image(50, 40, seed=0).save(tmp_path / "img" / "0.png")
    rows = [{"id": f"r{i}", "text": f"row {i}", "img": "img/0.png", **({"extra": 1} if i == 5 else {})}
            for i in range(6)]  # fmt: skip
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with monkeypatch.context() as patched:
        patched.setattr("rge.encoder.RGEEncoder.from_pretrained", _never_called)
        assert main(_args(corpus, tmp_path / "index", tiny_path)) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert "'extra', 'img'" in error and "no row has 'image'" in error and "--image-field" in error
    assert "--ignore-fields extra,img" in error and not (tmp_path / "index").exists()
    with pytest.raises(RGEJobError, match="'extra', 'img'"):  # the Python API refuses the same, before any row
        encode_corpus(corpus, tmp_path / "api", {}, _never_called, chunk_size=4)
    assert not (tmp_path / "api").exists()

    mapped = ("--image-field", "img", "--ignore-fields", "extra")
    assert main(_args(corpus, tmp_path / "mapped", tiny_path, *mapped)) == 0
    assert main(_args(corpus, tmp_path / "text", tiny_path, "--ignore-fields", "img,extra")) == 0
    with_images, text_only = load_embeddings(tmp_path / "mapped"), load_embeddings(tmp_path / "text")
    assert not np.allclose(with_images, text_only, atol=1e-3)  # the images were read

    pq.write_table(pa.table({"id": ["a"], "text": ["x"], "url": ["http://example.com"]}), tmp_path / "c.parquet")
    assert main(_args(tmp_path / "c.parquet", tmp_path / "p", tiny_path)) == 2
    assert "keys that no field maps: 'url'" in capsys.readouterr().err


def _never_called(*args, **kwargs):
    raise AssertionError("work started before the input's keys were checked")


def test_an_interrupted_encode_says_rerunning_resumes(tiny_path, tmp_path, capsys, monkeypatch):
    corpus = _write_corpus(tmp_path, count=12)
    args = _args(corpus, tmp_path / "index", tiny_path)
    real, calls = rge.corpus.encode_chunk, []

    def interrupted_on_the_third_chunk(*chunk_args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*chunk_args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(rge.corpus, "encode_chunk", interrupted_on_the_third_chunk)
        assert main(args) == 130
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == "rge encode: interrupted; rerun the same command to resume (finished shards are kept)"
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "index").glob("shard-*")}
    assert kept and not json.loads((tmp_path / "index" / "manifest.json").read_text())["complete"]
    assert main(args) == EXIT_ROWS_FAILED
    assert all((tmp_path / "index" / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    assert len(load_embeddings(tmp_path / "index")) == 12 - 2  # rows 5 and 9 are bad


@pytest.mark.parametrize("umask", [0o022, 0o002], indirect=True, ids=oct)
def test_every_file_of_an_index_follows_the_umask(umask, tiny_path, tmp_path):
    """Shards (safetensors) are as readable as the manifest beside them: others can read an index."""
    corpus = _write_corpus(tmp_path, count=6)
    main(_args(corpus, tmp_path / "index", tiny_path))
    modes = file_modes(tmp_path / "index")
    assert {"shard-00000.safetensors", "manifest.json", "errors.jsonl"} <= modes.keys()
    assert set(modes.values()) == {0o666 & ~umask}, modes
