"""A small MMEB-format snapshot built offline: real subset names, the real parquet schema, drawn images."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rge.testing import make_test_image

HATEFUL_QUERY = (
    "<|image_1|>\nRepresent the given image for binary classification to determine whether it constitutes"
    " hateful speech or not"
)
IMAGENET_QUERY = "<|image_1|>\nRepresent the given image for classification\n"
COCO_QUERY = "Find me an everyday image that matches the given caption: {}\n"
COCO_CANDIDATE = "<|image_1|>\nRepresent the given image.\n"


def build_mmeb_fixture(root: Path) -> tuple[Path, Path]:
    """Write three subsets (4 rows each) and their images; returns (data folder, image folder)."""
    data, images = root / "MMEB-eval", root / "MMEB-eval" / "eval_images"
    images.mkdir(parents=True)

    def image(name: str, seed: int, size: tuple[int, int] = (64, 48)) -> str:
        make_test_image(*size, seed=seed).save(images / name)
        return name

    subsets = {
        "HatefulMemes": [
            (HATEFUL_QUERY, image(f"meme{i}.png", i, (70 + 10 * i, 50)), ["Yes", "No"][:: 1 if i % 2 else -1], ["", ""])
            for i in range(4)
        ],
        "ImageNet-1K": [
            (IMAGENET_QUERY, image(f"in{i}.png", 10 + i, (60, 20 + 30 * i)), labels, [""] * 4)
            for i, labels in enumerate(
                [["goldfish", "tabby cat", "tiger", "car"], ["tabby cat", "goldfish", "tiger", "car"],
                 ["tiger", "car", "goldfish", "tabby cat"], ["car", "tiger", "tabby cat", "goldfish"]]
            )
        ],
        "MSCOCO_t2i": [
            (COCO_QUERY.format(caption), "", [COCO_CANDIDATE] * 3, [image(f"coco{j}.png", 20 + j) for j in order])
            for caption, order in [
                ("A cat on a mat.", [0, 1, 2]), ("A red car.", [1, 2, 0]),
                ("Two dogs in the park.", [2, 0, 1]), ("A cat on a mat.", [0, 2, 1]),
            ]
        ],
    }  # fmt: skip
    subsets["MSCOCO_t2i"][1][2][2] = "<|image_1|>\nA candidate whose image is missing.\n"
    subsets["MSCOCO_t2i"][1][3][2] = ""
    for subset, rows in subsets.items():
        (data / subset).mkdir(parents=True)
        columns = {
            "qry_text": [r[0] for r in rows],
            "qry_img_path": [r[1] for r in rows],
            "tgt_text": [list(r[2]) for r in rows],
            "tgt_img_path": [list(r[3]) for r in rows],
        }
        pq.write_table(pa.table(columns), data / subset / "test-00000-of-00001.parquet")
    return data, images
