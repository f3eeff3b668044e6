"""A small MMEB-train snapshot built offline, shaped like the hub's: subset configs declared in README.md, parquet
shards per split, an image folder, and per-subset rationale files in the two forms the join accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rge.testing import make_test_image

HATEFUL_QUERY = (
    "<|image_1|>\nRepresent the given image for binary classification to determine whether it constitutes"
    " hateful speech or not"
)
IMAGENET_QUERY = "<|image_1|>\nRepresent the given image for classification"
COCO_QUERY = "Find me an everyday image that matches the given caption: {}"
COCO_CANDIDATE = "<|image_1|>\nRepresent the given image."
SPLITS = ("original", "diverse_instruction")
MISSING_IMAGE = "MSCOCO_t2i/missing.png"
"""The positive image of MSCOCO_t2i's third row, which does not exist: a row training cannot use."""


def _row(query: str, query_image: str, positive: str, positive_image: str = "", negative: str = "") -> dict[str, str]:
    negatives = {"neg_text": f"[{negative!r}]", "neg_image_path": "['']"} if negative else {}
    return {"qry": query, "qry_image_path": query_image, "pos_text": positive, "pos_image_path": positive_image,
            "neg_text": "", "neg_image_path": "", **negatives}  # fmt: skip


def snapshot_rows(images: Path) -> dict[str, list[dict[str, str]]]:
    """The ``original`` split's rows by subset (drawing the images they name under ``images``)."""

    def image(name: str, seed: int) -> str:
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        make_test_image(40 + 8 * seed, 36, seed=seed).save(images / name)
        return name

    labels = ["Yes", "No", "No", "Yes", "No"]
    return {
        "HatefulMemes": [_row(HATEFUL_QUERY, image(f"HatefulMemes/meme{i}.png", i), label,
                              negative="No" if label == "Yes" else "Yes") for i, label in enumerate(labels)],
        "ImageNet_1K": [_row(IMAGENET_QUERY, image(f"ImageNet_1K/in{i}.png", 10 + i), label)
                        for i, label in enumerate(["goldfish", "tabby cat"])],
        "MSCOCO_t2i": [_row(COCO_QUERY.format(caption), "", COCO_CANDIDATE, path) for caption, path in [
            ("A cat on a mat.", image("MSCOCO_t2i/coco0.png", 20)), ("A red car.", image("MSCOCO_t2i/coco1.png", 21)),
            ("Two dogs in the park.", MISSING_IMAGE)]],
    }  # fmt: skip


def rationale(record: dict[str, str]) -> str:
    """The supervision rationale the fixture's files give ``record``."""
    return f"{record['qry'].split()[-1]} so {record['pos_text'].split()[-1]} ({record['qry_image_path'] or 'text'})"


def build_mmeb_train_snapshot(root: Path, *, readme: bool = True) -> tuple[Path, Path, Path]:
    """Write the snapshot; returns (snapshot folder, image folder, rationale folder).

    HatefulMemes' ``original`` split has two shards (3 + 2 rows); every subset has a ``diverse_instruction``
    split whose queries say so. Rationales: HatefulMemes.json is the authors' form (a JSON array of whole
    rows with ``rationale``) and misses the last row; MSCOCO_t2i.jsonl keys by query and image only and
    repeats its first record; ImageNet_1K has none.
    """
    snapshot, images, rationales = root / "MMEB-train", root / "images", root / "rationales"
    rows = snapshot_rows(images)
    for subset, records in rows.items():
        (snapshot / subset).mkdir(parents=True)
        shards = [records[:3], records[3:]] if subset == "HatefulMemes" else [records]
        for number, shard in enumerate(shards):
            name = f"original-{number:05d}-of-{len(shards):05d}.parquet"
            pq.write_table(pa.Table.from_pylist(shard), snapshot / subset / name)
        diverse = [{**record, "qry": "Diverse: " + record["qry"]} for record in records]
        pq.write_table(pa.Table.from_pylist(diverse), snapshot / subset / "diverse_instruction-00000-of-00001.parquet")
    if readme:
        configs = "".join(f"- config_name: {subset}\n  data_files:\n"
                          + "".join(f"  - split: {split}\n    path: {subset}/{split}-*\n" for split in SPLITS)
                          for subset in rows)  # fmt: skip
        (snapshot / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# MMEB-train\n", encoding="utf-8")
    rationales.mkdir()
    hateful = [{**record, "rationale": rationale(record)} for record in rows["HatefulMemes"][:-1]]
    (rationales / "HatefulMemes.json").write_text(json.dumps(hateful), encoding="utf-8")
    coco = [{"qry": row["qry"], "qry_image_path": row["qry_image_path"], "rationale": rationale(row)}
            for row in rows["MSCOCO_t2i"]]  # fmt: skip
    coco.append({**coco[0], "rationale": "a later, repeated record"})
    lines = "".join(json.dumps(record) + "\n" for record in coco)
    (rationales / "MSCOCO_t2i.jsonl").write_text(lines, encoding="utf-8")
    return snapshot, images, rationales
