"""The ``rge`` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    mmeb.add_argument("--data", required=True, help="local snapshot of TIGER-Lab/MMEB-eval (one folder per subset)")
    mmeb.add_argument("--images", required=True, help="folder the *_img_path values are relative to")
    mmeb.add_argument("--output", required=True, help="results folder (a rerun resumes from it)")
    mmeb.add_argument("--subsets", nargs="+", help="subsets to run (default: all 36)")
    add_model_options(mmeb)
    mmeb.add_argument("--no-reason", action="store_true", help="queries without reasoning (the paper's baseline)")
    encode = commands.add_parser("encode", help="encode a corpus (JSONL or parquet) into resumable shards")
    encode.add_argument("input", help="JSONL (one object per line: id, text, optional image) or parquet")
    encode.add_argument("--output", required=True, help="index folder (a rerun resumes from it)")
    encode.add_argument("--side", choices=["document", "query"], default="document")
    encode.add_argument("--shard-size", type=int, default=10000)
    add_model_options(encode)
    encode.add_argument("--ray", action="store_true", help="run on a Ray cluster (pip install 'rge[ray]')")
    encode.add_argument("--ray-address", help="cluster to join (default: start a local one; 'auto' to find one)")
    encode.add_argument("--workers", type=int, default=1, help="Ray actors, each with its own model copy")
    args = parser.parse_args(argv)
    if args.command == "eval":
        return run_mmeb(args)
    if args.command == "encode":
        return run_encode(args)
    return run_demo(args.model, tiny=args.tiny, image=args.image, device=args.device)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and loading options that every model-running command takes."""
    parser.add_argument("--model", default="MCG-NJU/RGE", help="hub id or local checkpoint directory")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="reasoning budget of the query path")
    parser.add_argument("--min-pixels", type=int, help="default 256*28*28")
    parser.add_argument("--max-pixels", type=int, help="default 1024*28*28")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument(
        "--repetition-penalty",
        type=positive_float,
        help="query decoding (default: the checkpoint's generation config; 1.0: plain greedy)",
    )


def positive_float(value: str) -> float:
    """An argparse type: a number above 0 (argparse turns the error into one line and exit status 2)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be above 0")
    return number


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """``RGEEncoder.from_pretrained`` keyword arguments from ``add_model_options``' options."""
    return {"device": args.device, "dtype": args.dtype, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels,
            "max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty}  # fmt: skip


def run_mmeb(args: argparse.Namespace) -> int:
    """``rge eval mmeb``: evaluate, then print the report."""
    from rge import RGEEncoder
    from rge.eval import mmeb

    try:
        subsets = mmeb.resolve_subsets(Path(args.data), args.subsets)
    except (ValueError, FileNotFoundError) as error:
        print(f"rge eval mmeb: {error}", file=sys.stderr)
        return 2
    encoder = RGEEncoder.from_pretrained(args.model, **load_options(args))
    summary = mmeb.evaluate(
        encoder, args.data, args.images, args.output, subsets, reason=not args.no_reason, batch_size=args.batch_size
    )
    print(mmeb.format_table(summary))
    print(f"results in {args.output}")
    return 0


ENCODE_EXIT_ROWS_FAILED = 3
"""``rge encode`` exit status when the job finished but some rows were reported in errors.jsonl."""


def run_encode(args: argparse.Namespace) -> int:
    """``rge encode``: stream the input into shards, resuming from what ``--output`` already holds."""
    from rge.corpus import RGEJobError, encode_corpus, local_encode_rows
    from rge.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    load = load_options(args)
    settings = {
        "model": args.model, "side": args.side, "dtype": args.dtype,
        "min_pixels": args.min_pixels or DEFAULT_MIN_PIXELS, "max_pixels": args.max_pixels or DEFAULT_MAX_PIXELS,
        "max_new_tokens": args.max_new_tokens if args.side == "query" else None,
    }  # fmt: skip
    if not Path(args.input).is_file():
        print(f"rge encode: input file {args.input!r} not found", file=sys.stderr)
        return 2
    if args.side == "query":
        from rge.loading import read_generation_settings

        settings["generation"] = read_generation_settings(
            args.model, repetition_penalty=args.repetition_penalty
        ).as_dict()
    if args.ray:
        from rge.integrations.ray import ray_encode_rows

        encode_rows = ray_encode_rows(args.model, args.side, args.batch_size, workers=args.workers,
                                      address=args.ray_address, load_kwargs=load)  # fmt: skip
    else:
        from rge import RGEEncoder

        encoder = RGEEncoder.from_pretrained(args.model, **load)
        encode_rows = local_encode_rows(encoder, args.side, args.batch_size)
    try:
        report = encode_corpus(args.input, args.output, settings, encode_rows, chunk_size=4 * args.batch_size,
                               shard_size=args.shard_size)  # fmt: skip
    except RGEJobError as error:
        print(f"rge encode: {error}", file=sys.stderr)
        return 2
    print(f"encoded {report.encoded} of {report.rows} rows into {report.shards} shards in {report.output}")
    if report.failed:
        print(f"{report.failed} rows failed; see {report.output / 'errors.jsonl'}", file=sys.stderr)
        return ENCODE_EXIT_ROWS_FAILED
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
