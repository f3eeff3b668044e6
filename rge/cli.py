"""The ``rge`` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

DEMO_QUERY = "Answer the question based on the given image: What is in the image?\n"
DEMO_CANDIDATES = [
    "Summarize the following answer in one word: A cat and a dog.",
    "Summarize the following answer in one word: A cat and a tiger.",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rge`` command."""
    parser = argparse.ArgumentParser(prog="rge", description="Reasoning Guided Embeddings for text and images.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="encode the paper's demo query against two candidates")
    demo.add_argument("--model", default="MCG-NJU/RGE", help="hub id or local checkpoint directory")
    demo.add_argument("--tiny", action="store_true", help="use a tiny random checkpoint built offline")
    demo.add_argument("--image", help="image for the query (default: a drawn picture)")
    demo.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    evaluation = commands.add_parser("eval", help="reproduce a benchmark of the paper").add_subparsers(
        dest="benchmark", required=True
    )
    mmeb = evaluation.add_parser("mmeb", help="MMEB (36 image tasks, Precision@1) with the authors' protocol")
    mmeb.add_argument("--model", default="MCG-NJU/RGE", help="hub id or local checkpoint directory")
    mmeb.add_argument("--data", required=True, help="local snapshot of TIGER-Lab/MMEB-eval (one folder per subset)")
    mmeb.add_argument("--images", required=True, help="folder the *_img_path values are relative to")
    mmeb.add_argument("--output", required=True, help="results folder (a rerun resumes from it)")
    mmeb.add_argument("--subsets", nargs="+", help="subsets to run (default: all 36)")
    mmeb.add_argument("--batch-size", type=int, default=16)
    mmeb.add_argument("--max-new-tokens", type=int, default=128)
    mmeb.add_argument("--min-pixels", type=int, help="default 256*28*28")
    mmeb.add_argument("--max-pixels", type=int, help="default 1024*28*28")
    mmeb.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    mmeb.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")
    mmeb.add_argument("--no-reason", action="store_true", help="queries without reasoning (the paper's baseline)")
    args = parser.parse_args(argv)
    if args.command == "eval":
        return run_mmeb(args)
    return run_demo(args.model, tiny=args.tiny, image=args.image, device=args.device)


def run_mmeb(args: argparse.Namespace) -> int:
    """``rge eval mmeb``: evaluate, then print the report."""
    from rge import RGEEncoder
    from rge.eval import mmeb

    try:
        subsets = mmeb.resolve_subsets(Path(args.data), args.subsets)
    except (ValueError, FileNotFoundError) as error:
        print(f"rge eval mmeb: {error}", file=sys.stderr)
        return 2
    encoder = RGEEncoder.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    summary = mmeb.evaluate(
        encoder, args.data, args.images, args.output, subsets, reason=not args.no_reason, batch_size=args.batch_size
    )
    print(mmeb.format_table(summary))
    print(f"results in {args.output}")
    return 0


def run_demo(model: str, *, tiny: bool, image: str | None, device: str | None) -> int:
    """Reason about the query image, embed the two candidates, print rationale and cosine scores."""
    from rge import RGEEncoder

    with tempfile.TemporaryDirectory() as scratch:
        if tiny:
            from rge.testing import build_tiny_checkpoint

            model = str(build_tiny_checkpoint(scratch))
        encoder = RGEEncoder.from_pretrained(model, device=device)
        picture = image if image is not None else demo_picture()
        query, rationale = encoder.encode_query(DEMO_QUERY, images=[picture], return_rationales=True)
        candidates = encoder.encode_document(DEMO_CANDIDATES)
        scores = encoder.similarity(query, candidates)[0]
    print(f"model:     {'tiny random checkpoint (--tiny)' if tiny else model}")
    print(f"query:     [image: {image or 'drawn picture'}] {DEMO_QUERY.strip()}")
    print(f"rationale: {rationale!r}")
    for text, score in zip(DEMO_CANDIDATES, scores):
        print(f"{score:.4f}  {text}")
    return 0


def demo_picture():  # type: ignore[no-untyped-def]
    """A simple drawn picture (two animal-like figures), used when no ``--image`` is given."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (448, 336), (205, 225, 240))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 250, 448, 336), fill=(110, 170, 90))
    for x, colour in ((90, (240, 150, 60)), (270, (120, 90, 60))):
        draw.ellipse((x, 170, x + 120, 260), fill=colour)
        draw.ellipse((x + 80, 120, x + 150, 190), fill=colour)
        draw.polygon([(x + 88, 130), (x + 98, 95), (x + 112, 125)], fill=colour)
        draw.polygon([(x + 120, 125), (x + 135, 95), (x + 142, 135)], fill=colour)
    return picture


if __name__ == "__main__":
    sys.exit(main())
