"""MMEB (36 image tasks, Precision@1) with the authors' protocol: resumable, with a readable report.

Protocol: per-subset rewrite rules (value_map -> replace -> prefix -> suffix, then a trailing newline),
``<|image_1|>`` to the vision block (removed when there is no image), unique (text, image) pairs
encoded once, queries through the reasoning path (``reason=False``: ``<emb>`` appended, the paper's
no-reasoning baseline), candidates through the candidate path, cosine scores, correct when the argmax
is candidate 0 (ties go to 0). Images are loaded as stored (no EXIF rotation), as the authors do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import RGEDataError, RGESettingsError
from ..mmeb_rules import load_rules, rewrite
from ..prompts import marker_to_vision
from ..storage import atomic_write_json, atomic_write_text, changed_settings, load_arrays, save_arrays

GROUPS: dict[str, list[str]] = {
    "Classification": ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
                       "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"],
    "VQA": ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA",
            "Visual7W", "ScienceQA", "VizWiz", "GQA", "TextVQA"],
    "Retrieval": ["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
                  "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"],
    "Grounding": ["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"],
}  # fmt: skip
DISTRIBUTIONS: dict[str, list[str]] = {
    "IND": ["ImageNet-1K", "N24News", "HatefulMemes", "SUN397", "VOC2007", "InfographicsVQA", "ChartQA",
            "A-OKVQA", "DocVQA", "OK-VQA", "Visual7W", "VisDial", "CIRR", "NIGHTS", "WebQA", "VisualNews_i2t",
            "VisualNews_t2i", "MSCOCO_i2t", "MSCOCO_t2i", "MSCOCO"],
    "OOD": ["Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211", "ScienceQA", "VizWiz", "GQA",
            "TextVQA", "OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ", "Visual7W-Pointing", "RefCOCO",
            "RefCOCO-Matching"],
}  # fmt: skip
SUBSETS: list[str] = [subset for members in GROUPS.values() for subset in members]
SUMMARY_ROWS = ["Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall"]
PAPER: dict[str, dict[str, float]] = {
    "RGE": dict(zip(SUMMARY_ROWS, [64.4, 67.8, 70.2, 90.1, 75.3, 63.7, 70.1])),
    "no reasoning": dict(zip(SUMMARY_ROWS, [59.5, 59.9, 66.8, 88.0, 70.6, 58.4, 65.2])),
}
"""The paper's MMEB v1 Precision@1 (%) for RGE and for the same backbone without reasoning."""

COLUMNS: dict[str, str] = {
    "qry_text": "string",
    "qry_img_path": "string",
    "tgt_text": "list of strings",
    "tgt_img_path": "list of strings",
}
"""The columns every subset's parquet files must have, and what each holds per row: the query's text and
image path ("" for none), the candidates' texts (the positive first) and their image paths, one per text."""

Pair = tuple[str, str]  # (rewritten text, image path relative to the image folder; "" for none)


@dataclass(frozen=True)
class Row:
    """One MMEB example after rewriting: a query and its candidates, the positive first."""

    query: Pair
    candidates: list[Pair]


def available_subsets(data_dir: Path) -> list[str]:
    """Subset folders of a local MMEB snapshot that hold parquet files."""
    if not data_dir.is_dir():
        return []
    return sorted(p.name for p in data_dir.iterdir() if p.is_dir() and any(p.glob("**/*.parquet")))


def resolve_subsets(data_dir: Path, subsets: Sequence[str] | None) -> list[str]:
    """The subsets to run (default: all 36), each with the columns it must have (``check_subset``), or a
    clear error naming what is missing or wrong and what is there."""
    wanted = list(subsets) if subsets else SUBSETS
    unknown = [s for s in wanted if s not in SUBSETS]
    if unknown:
        raise ValueError(f"unknown MMEB subsets {unknown}; the 36 subsets are: {', '.join(SUBSETS)}")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"MMEB data folder {str(data_dir)!r} does not exist (see docs/evaluation.md)")
    present = available_subsets(data_dir)
    missing = [s for s in wanted if s not in present]
    if missing:
        raise FileNotFoundError(
            f"no parquet files for {missing} under {str(data_dir)!r}; available: {', '.join(present) or 'none'}"
        )
    for subset in wanted:
        check_subset(data_dir, subset)
    return wanted


def check_subset(data_dir: Path, subset: str) -> None:
    """Refuse a subset whose files lack a column of ``COLUMNS``, hold another type in one, or have a row
    with a missing value, no candidate, or not one image path per candidate text (``RGEDataError``)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for file in _files(data_dir, subset):
        where = file.relative_to(data_dir)
        schema = pq.read_schema(file)
        for name, shape in COLUMNS.items():
            if name not in schema.names:
                raise RGEDataError(f"{where} has no column {name!r} (a {shape} per row; see docs/evaluation.md)")
            if _shape(schema.field(name).type) != shape:
                raise RGEDataError(f"{where}: column {name!r} holds {schema.field(name).type}; expected a {shape} "
                                   "per row (see docs/evaluation.md)")  # fmt: skip
        table = pq.read_table(file, columns=list(COLUMNS))
        texts, paths = (pc.list_value_length(table[name]) for name in ("tgt_text", "tgt_img_path"))
        problems = {f"no value in {name!r}": table[name].is_null() for name in COLUMNS}
        problems["no candidate (an empty 'tgt_text')"] = pc.equal(texts, 0)
        problems["not one 'tgt_img_path' entry per 'tgt_text' entry"] = pc.not_equal(texts, paths)
        for problem, flags in problems.items():
            rows = [row for row, flag in enumerate(flags.to_pylist()) if flag]
            if rows:
                more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
                raise RGEDataError(f"{where}: row {rows[0]} has {problem}{more}")
        for name in ("tgt_text", "tgt_img_path"):
            column = table[name].combine_chunks()
            items = pc.list_flatten(column)
            if items.null_count:
                row = pc.filter(pc.list_parent_indices(column), items.is_null())[0].as_py()
                raise RGEDataError(f"{where}: row {row} has a missing value inside {name!r}")


def _shape(kind: Any) -> str | None:
    import pyarrow as pa

    def strings(value: Any) -> bool:
        return bool(pa.types.is_string(value) or pa.types.is_large_string(value))

    if strings(kind):
        return "string"
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and strings(kind.value_type):
        return "list of strings"
    return None


def _files(data_dir: Path, subset: str) -> list[Path]:
    return sorted((data_dir / subset).glob("**/*.parquet"))


def read_subset(data_dir: Path, subset: str) -> list[Row]:
    """The subset's rows with query and candidate texts rewritten by the subset's rules."""
    import pyarrow.parquet as pq

    query_rules = load_rules("query").get(subset, {})
    candidate_rules = load_rules("candidate").get(subset, {})
    rows = []
    for file in _files(data_dir, subset):
        table = pq.read_table(file, columns=list(COLUMNS)).to_pylist()
        for record in table:
            candidates = [
                (rewrite(text, candidate_rules), path)
                for text, path in zip(record["tgt_text"], record["tgt_img_path"], strict=True)
            ]
            rows.append(Row((rewrite(record["qry_text"], query_rules), record["qry_img_path"]), candidates))
    return rows


def model_input(pair: Pair, image_dir: Path) -> dict[str, Any]:
    """An encoder item: the marker becomes the vision block, removed when the pair has no image."""
    text, image_path = pair
    text = marker_to_vision(text, bool(image_path))
    return {"text": text, "image": image_dir / image_path} if image_path else {"text": text}


def predictions(rows: Sequence[Row], queries: dict[Pair, np.ndarray], candidates: dict[Pair, np.ndarray]) -> list[int]:
    """Per row, the index of the best-scoring candidate (cosine; the first one wins ties)."""
    out = []
    for row in rows:
        query = _unit(queries[row.query])
        scores = np.stack([_unit(candidates[pair]) for pair in row.candidates]) @ query
        out.append(int(np.argmax(scores)))
    return out


def summarize(accuracies: dict[str, float]) -> dict[str, Any]:
    """Group means (percent) over the subsets that were run, beside the paper's numbers."""
    members = {**GROUPS, **DISTRIBUTIONS, "Overall": SUBSETS}
    groups = {}
    for name in SUMMARY_ROWS:
        done = [accuracies[s] for s in members[name] if s in accuracies]
        if done:
            groups[name] = {"score": 100 * float(np.mean(done)), "subsets": len(done), "of": len(members[name])}
    return {"subsets": {s: 100 * accuracies[s] for s in SUBSETS if s in accuracies}, "groups": groups, "paper": PAPER}


def format_table(summary: dict[str, Any]) -> str:
    """The report: each subset, then the groups beside the paper's RGE and no-reasoning numbers."""
    lines = [f"{'subset':<20} {'P@1':>6}", "-" * 27]
    lines += [f"{subset:<20} {score:>6.1f}" for subset, score in summary["subsets"].items()]
    lines += ["", f"{'group':<16} {'ours':>6} {'paper RGE':>10} {'paper no-reason':>16} {'subsets':>8}", "-" * 60]
    for name, group in summary["groups"].items():
        lines.append(
            f"{name:<16} {group['score']:>6.1f} {PAPER['RGE'][name]:>10.1f} {PAPER['no reasoning'][name]:>16.1f}"
            f" {group['subsets']:>4}/{group['of']}"
        )
    return "\n".join(lines)


def evaluate(
    encoder: Any,
    data_dir: str | Path,
    image_dir: str | Path,
    output_dir: str | Path,
    subsets: Sequence[str] | None = None,
    *,
    reason: bool = True,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    chunk_size: int = 256,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run MMEB with ``encoder`` and write per-subset results and ``summary.json`` to ``output_dir``.

    Embeddings are saved in chunks as they are computed, so an interrupted run resumes where it stopped;
    a subset whose ``<subset>_score.json`` exists is skipped. Returns the summary.
    """
    data_dir, image_dir, output_dir = Path(data_dir), Path(image_dir), Path(output_dir)
    chosen = resolve_subsets(data_dir, subsets)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": str(encoder.checkpoint.path), "reason": reason,
        "max_new_tokens": max_new_tokens or encoder.max_new_tokens,
        "min_pixels": encoder.checkpoint.vision.min_pixels, "max_pixels": encoder.checkpoint.vision.max_pixels,
        "dtype": str(encoder.dtype), "generation": encoder.generation_settings.as_dict() if reason else None,
    }  # fmt: skip
    _check_settings(output_dir / "run.json", settings)
    run = _SubsetRun(encoder, image_dir, output_dir, reason, batch_size, max_new_tokens, chunk_size, show_progress)
    accuracies = {subset: run(subset, read_subset(data_dir, subset)) for subset in chosen}
    summary = {**summarize(accuracies), "settings": settings}
    atomic_write_json(output_dir / "summary.json", summary)
    return summary


def check_output(output_dir: str | Path, settings: dict[str, Any]) -> None:
    """Refuse an output folder holding results made with other ``settings`` (any subset of those
    ``evaluate`` records), without writing anything: for a check before the model is loaded."""
    output = Path(output_dir)
    changed = changed_settings(output / "run.json", settings)
    if changed:
        raise RGESettingsError(
            f"{output} holds results made with other settings {changed} (before, now); use another --output folder"
        )


def _check_settings(path: Path, settings: dict[str, Any]) -> None:
    check_output(path.parent, settings)
    atomic_write_json(path, settings)


@dataclass
class _SubsetRun:
    """Encodes one subset's unique pairs in resumable chunks, scores it and writes its files."""

    encoder: Any
    image_dir: Path
    output_dir: Path
    reason: bool
    batch_size: int
    max_new_tokens: int | None
    chunk_size: int
    show_progress: bool

    def __call__(self, subset: str, rows: list[Row]) -> float:
        score_path = self.output_dir / f"{subset}_score.json"
        if score_path.exists():
            return float(json.loads(score_path.read_text(encoding="utf-8"))["acc"])
        queries = sorted({row.query for row in rows})
        candidates = sorted({pair for row in rows for pair in row.candidates})
        with tqdm(
            total=len(queries) + len(candidates), desc=subset, unit="item", disable=not self.show_progress
        ) as bar:
            query_vectors, rationales = self._encode(subset, "qry", queries, self.reason, bar)
            candidate_vectors, _ = self._encode(subset, "tgt", candidates, False, bar)
        predicted = predictions(rows, dict(zip(queries, query_vectors)), dict(zip(candidates, candidate_vectors)))
        generated = "".join(
            json.dumps({"text": text, "image": image, "generated_text": rationale}, ensure_ascii=False) + "\n"
            for (text, image), rationale in zip(queries, rationales)
        )
        atomic_write_text(self.output_dir / f"{subset}_generated.jsonl", generated)
        atomic_write_text(self.output_dir / f"{subset}_pred.jsonl", "".join(f"{p}\n" for p in predicted))
        correct = sum(p == 0 for p in predicted)
        atomic_write_json(score_path, {"acc": correct / len(rows), "num_correct": correct, "num_pred": len(rows)})
        return correct / len(rows)

    def _encode(
        self, subset: str, side: str, pairs: list[Pair], reason: bool, bar: tqdm
    ) -> tuple[np.ndarray, list[str]]:
        final = self.output_dir / f"{subset}_{side}.safetensors"
        if final.exists():
            arrays, metadata = load_arrays(final)
            bar.update(len(pairs))
            return arrays["embeddings"], metadata["rationales"]
        vectors, rationales = [], []
        for start in range(0, len(pairs), self.chunk_size):
            chunk = pairs[start : start + self.chunk_size]
            part = self.output_dir / f"{subset}_{side}.part{start // self.chunk_size:05d}.safetensors"
            if part.exists():
                arrays, metadata = load_arrays(part)
            else:
                embedded, texts = self.encoder.encode(
                    [model_input(pair, self.image_dir) for pair in chunk],
                    reason=reason,
                    batch_size=self.batch_size,
                    max_new_tokens=self.max_new_tokens,
                    return_rationales=True,
                    show_progress_bar=False,
                    exif_transpose=False,
                )
                arrays, metadata = {"embeddings": embedded}, {"pairs": chunk, "rationales": list(texts)}
                save_arrays(part, arrays, metadata)
            vectors.append(arrays["embeddings"])
            rationales += metadata["rationales"]
            bar.update(len(chunk))
        embeddings = np.concatenate(vectors) if vectors else np.zeros((0, self.encoder.embedding_dim), np.float32)
        save_arrays(final, {"embeddings": embeddings}, {"pairs": pairs, "rationales": rationales})
        for part in self.output_dir.glob(f"{subset}_{side}.part*.safetensors"):
            part.unlink()
        return embeddings, rationales


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)
