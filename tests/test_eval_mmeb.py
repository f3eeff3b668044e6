"""`rge eval mmeb`: the authors' protocol, checked against a by-hand computation with the reference."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rge import RGEError
from rge.cli import main
from rge.errors import RGEDataError
from rge.eval import mmeb

from .conftest import BUDGET, MAX_PIXELS, MIN_PIXELS, file_modes
from .mmeb_fixture import build_mmeb_fixture

# By hand, from the YAML files: the rewritten texts each fixture subset must produce.
QUERY_BY_HAND = {
    "HatefulMemes": lambda t: t.replace(
        "Represent the given image for binary classification to determine whether it constitutes hateful speech or not",
        "Determine whether the given image contains hateful speech or not for binary classification",
    ),
    "ImageNet-1K": lambda t: t.replace(
        "Represent the given image for classification",
        "Identify the category of the main object in the given image for classification",
    ),
    "MSCOCO_t2i": lambda t: t.replace(
        "Find me an everyday image that matches the given caption",
        "Describe and represent the following descriptive caption for everyday image retrieval",
    ),
}
CANDIDATE_BY_HAND = {
    "HatefulMemes": lambda t: {
        "Yes": "Summarize the following statement in one word: Yes, it contains hateful speech.",
        "No": "Summarize the following statement in one word: No, it does not contain hateful speech.",
    }[t],
    "ImageNet-1K": lambda t: "Summarize the following object category in one word: " + t,
    "MSCOCO_t2i": lambda t: t.replace("Represent the given image", "Summarize the given image in one word"),
}


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    return build_mmeb_fixture(tmp_path_factory.mktemp("mmeb"))


def _newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _by_hand(reference, data, images, subset):
    """Accuracy and predictions computed independently: rules by hand, the batch-1 reference algorithm."""
    rows = pq.read_table(data / subset / "test-00000-of-00001.parquet").to_pylist()

    def prepare(text, path):
        text = text.replace("<|image_1|>", "<|vision_start|><|image_pad|><|vision_end|>")
        if not path:
            return text.replace("<|vision_start|><|image_pad|><|vision_end|>", ""), None
        return text, Image.open(images / path)

    predicted = []
    for row in rows:
        query, _ = reference.query(*prepare(_newline(QUERY_BY_HAND[subset](row["qry_text"])), row["qry_img_path"]),
                                   max_new_tokens=BUDGET)  # fmt: skip
        candidates = [
            reference.candidate(*prepare(_newline(CANDIDATE_BY_HAND[subset](text)), path))
            for text, path in zip(row["tgt_text"], row["tgt_img_path"])
        ]
        scores = [float(query @ c / (query.norm() * c.norm())) for c in candidates]
        predicted.append(int(np.argmax(scores)))
    return sum(p == 0 for p in predicted) / len(rows), predicted


def test_accuracy_equals_the_protocol_applied_by_hand(encoder, reference, fixture_dirs, tmp_path):
    data, images = fixture_dirs
    summary = mmeb.evaluate(encoder, data, images, tmp_path, ["HatefulMemes", "ImageNet-1K", "MSCOCO_t2i"],
                            batch_size=3, chunk_size=3, show_progress=False)  # fmt: skip
    for subset in ("HatefulMemes", "ImageNet-1K", "MSCOCO_t2i"):
        accuracy, predicted = _by_hand(reference, data, images, subset)
        assert (tmp_path / f"{subset}_pred.jsonl").read_text().split() == [str(p) for p in predicted]
        score = json.loads((tmp_path / f"{subset}_score.json").read_text())
        assert score == {"acc": accuracy, "num_correct": round(accuracy * 4), "num_pred": 4}
        assert summary["subsets"][subset] == pytest.approx(100 * accuracy)
        generated = [json.loads(line) for line in (tmp_path / f"{subset}_generated.jsonl").read_text().splitlines()]
        assert all(set(g) == {"text", "image", "generated_text"} for g in generated)
    assert summary["groups"]["Overall"]["subsets"] == 3
    expected_overall = np.mean(list(summary["subsets"].values()))
    assert summary["groups"]["Overall"]["score"] == pytest.approx(expected_overall)
    assert json.loads((tmp_path / "summary.json").read_text())["groups"] == summary["groups"]


def test_unique_pairs_are_encoded_once(encoder, fixture_dirs, tmp_path, monkeypatch):
    data, images = fixture_dirs
    seen = []
    original = encoder.encode

    def counting(items, **kwargs):
        seen.extend((item["text"], str(item.get("image")), kwargs["reason"]) for item in items)
        return original(items, **kwargs)

    monkeypatch.setattr(encoder, "encode", counting)
    mmeb.evaluate(encoder, data, images, tmp_path, ["HatefulMemes"], show_progress=False)
    assert len(seen) == len(set(seen)) == 4 + 2  # 4 distinct query images, candidates "Yes" and "No"
    assert sum(reason for *_, reason in seen) == 4


def test_interrupted_run_resumes_without_recomputing(encoder, fixture_dirs, tmp_path, monkeypatch):
    data, images = fixture_dirs
    subsets = ["ImageNet-1K", "MSCOCO_t2i"]
    clean = mmeb.evaluate(encoder, data, images, tmp_path / "clean", subsets, chunk_size=2, show_progress=False)
    original, calls = encoder.encode, []

    def crashing(items, **kwargs):
        calls.append(len(items))
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return original(items, **kwargs)

    monkeypatch.setattr(encoder, "encode", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mmeb.evaluate(encoder, data, images, tmp_path / "run", subsets, chunk_size=2, show_progress=False)
    assert (tmp_path / "run" / "ImageNet-1K_score.json").exists()
    assert not (tmp_path / "run" / "MSCOCO_t2i_score.json").exists()
    before_crash = sum(calls[:-1])
    calls.clear()
    resumed = mmeb.evaluate(encoder, data, images, tmp_path / "run", subsets, chunk_size=2, show_progress=False)
    coco_rows = mmeb.read_subset(data, "MSCOCO_t2i")
    coco_pairs = len({r.query for r in coco_rows}) + len({p for r in coco_rows for p in r.candidates})
    total_pairs = 4 + 4 + coco_pairs  # ImageNet-1K: 4 distinct query images, 4 labels
    assert before_crash + sum(calls) == total_pairs  # nothing computed twice
    assert resumed["subsets"] == clean["subsets"]
    for subset in subsets:
        np.testing.assert_allclose(
            mmeb.load_arrays(tmp_path / "run" / f"{subset}_qry.safetensors")[0]["embeddings"],
            mmeb.load_arrays(tmp_path / "clean" / f"{subset}_qry.safetensors")[0]["embeddings"],
            atol=1e-6,
        )
    assert not list((tmp_path / "run").glob("*.part*"))
    calls.clear()
    mmeb.evaluate(encoder, data, images, tmp_path / "run", subsets, chunk_size=2, show_progress=False)
    assert calls == []  # finished subsets are skipped


def test_results_follow_the_umask(encoder, fixture_dirs, tmp_path, umask):
    data, images = fixture_dirs
    mmeb.evaluate(encoder, data, images, tmp_path, ["HatefulMemes"], show_progress=False)
    modes = file_modes(tmp_path)
    assert any(name.endswith(".safetensors") for name in modes) and set(modes.values()) == {0o664}, modes


def test_other_settings_in_the_same_output_are_refused(encoder, fixture_dirs, tmp_path):
    data, images = fixture_dirs
    mmeb.evaluate(encoder, data, images, tmp_path, ["HatefulMemes"], show_progress=False)
    with pytest.raises(ValueError, match="other settings"):
        mmeb.evaluate(encoder, data, images, tmp_path, ["HatefulMemes"], reason=False, show_progress=False)


def test_missing_data_and_unknown_subsets_are_clear(fixture_dirs, tmp_path):
    data, _ = fixture_dirs
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mmeb.resolve_subsets(tmp_path / "nope", None)
    with pytest.raises(ValueError, match="unknown MMEB subsets.*ImageNet-1K"):
        mmeb.resolve_subsets(data, ["ImageNet1K"])
    with pytest.raises(FileNotFoundError, match="available: HatefulMemes, ImageNet-1K, MSCOCO_t2i"):
        mmeb.resolve_subsets(data, None)


def test_groups_cover_the_36_subsets_once():
    assert len(mmeb.SUBSETS) == len(set(mmeb.SUBSETS)) == 36
    assert sorted(mmeb.DISTRIBUTIONS["IND"] + mmeb.DISTRIBUTIONS["OOD"]) == sorted(mmeb.SUBSETS)


def test_cli_defaults_to_all_36_and_says_what_is_missing(tiny_path, fixture_dirs, tmp_path, capsys):
    data, images = fixture_dirs
    code = main(["eval", "mmeb", "--model", str(tiny_path), "--data", str(data), "--images", str(images),
                 "--output", str(tmp_path)])  # fmt: skip
    assert code == 2
    assert "no parquet files for" in capsys.readouterr().err


def test_cli_runs_end_to_end(tiny_path, fixture_dirs, tmp_path, capsys):
    data, images = fixture_dirs
    code = main(["eval", "mmeb", "--model", str(tiny_path), "--data", str(data), "--images", str(images),
                 "--output", str(tmp_path), "--device", "cpu", "--max-new-tokens", "8",
                 "--subsets", "HatefulMemes", "ImageNet-1K", "MSCOCO_t2i",
                 "--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["subsets"]) == {"HatefulMemes", "ImageNet-1K", "MSCOCO_t2i"}
    assert f"{summary['groups']['Overall']['score']:>6.1f}" in out
    assert "paper RGE" in out and "70.1" in out and "65.2" in out
    assert summary["settings"]["max_new_tokens"] == 8
    assert summary["settings"]["generation"]["repetition_penalty"] == 1.05  # the checkpoint's decoding, recorded
    assert json.loads((tmp_path / "run.json").read_text())["generation"]["top_k"] == 1


def test_cli_refuses_other_settings_before_loading(tiny_path, fixture_dirs, tmp_path, capsys, monkeypatch):
    data, images = fixture_dirs
    (tmp_path / "run.json").write_text(json.dumps({"reason": True, "max_new_tokens": 8}))
    monkeypatch.setattr("rge.encoder.RGEEncoder.from_pretrained", _never_loaded)
    code = main(["eval", "mmeb", "--model", str(tiny_path), "--data", str(data), "--images", str(images),
                 "--output", str(tmp_path), "--max-new-tokens", "16", "--subsets", "HatefulMemes"])  # fmt: skip
    assert code == 2
    assert "'max_new_tokens': (8, 16)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def _never_loaded(*args, **kwargs):
    raise AssertionError("the model was loaded before the output folder was checked")


@pytest.mark.parametrize(
    "column, values, said",
    [
        ("tgt_text", ["Yes", "No", "Yes", "No"], "column 'tgt_text' holds string; expected a list of strings per row"),
        ("tgt_img_path", [[[""], [""]]] * 4,
         "column 'tgt_img_path' holds list<element: list<element: string>>; expected a list of strings per row"),
        ("qry_img_path", None, "has no column 'qry_img_path' (a string per row"),
        ("tgt_img_path", [[""]] * 4, "row 0 has not one 'tgt_img_path' entry per 'tgt_text' entry (and 3 more rows)"),
        ("qry_text", ["a", None, "b", "c"], "row 1 has no value in 'qry_text'"),
    ],
)  # fmt: skip
def test_columns_of_the_wrong_shape_are_named_and_nothing_is_written(
    encoder, tiny_path, fixture_dirs, tmp_path, capsys, monkeypatch, column, values, said
):
    data, images = fixture_dirs
    table = pq.read_table(data / "HatefulMemes" / "test-00000-of-00001.parquet")
    if values is None:
        table = table.drop_columns([column])
    else:
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(values))
    (tmp_path / "data" / "HatefulMemes").mkdir(parents=True)
    pq.write_table(table, tmp_path / "data" / "HatefulMemes" / "part.parquet")

    with pytest.raises(RGEError) as raised:
        mmeb.evaluate(encoder, tmp_path / "data", images, tmp_path / "python", ["HatefulMemes"], show_progress=False)
    assert isinstance(raised.value, RGEDataError) and str(raised.value).startswith("HatefulMemes/part.parquet")
    assert said in str(raised.value)
    monkeypatch.setattr("rge.encoder.RGEEncoder.from_pretrained", _never_loaded)
    code = main(["eval", "mmeb", "--model", str(tiny_path), "--data", str(tmp_path / "data"), "--images", str(images),
                 "--output", str(tmp_path / "cli"), "--subsets", "HatefulMemes"])  # fmt: skip
    assert code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "python").exists() and not (tmp_path / "cli").exists()
