"""The commands: each checks its arguments and output folder first, then loads the model once."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED, CLIError, model_error
from .options import check_input_folder, check_output_folder, load_options

DEMO_QUERY = "Answer the question based on the given image: What is in the image?\n"
DEMO_CANDIDATES = [
    "Summarize the following answer in one word: A cat and a dog.",
    "Summarize the following answer in one word: A cat and a tiger.",
]


def load_encoder(model: str, options: dict[str, Any], *, offer_tiny: bool = False) -> Any:
    """``RGEEncoder.from_pretrained`` with loading failures turned into one-line errors."""
    from ..encoder import RGEEncoder

    try:
        return RGEEncoder.from_pretrained(model, **options)
    except Exception as error:
        explained = model_error(error, model, offer_tiny=offer_tiny)
        if explained is None:
            raise
        raise explained from error


def pixel_budget(args: argparse.Namespace) -> dict[str, int]:
    """The image budget a run records: the options given, else the paper's defaults."""
    from ..vision import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    return {"min_pixels": args.min_pixels or DEFAULT_MIN_PIXELS, "max_pixels": args.max_pixels or DEFAULT_MAX_PIXELS}


def run_mmeb(args: argparse.Namespace) -> int:
    """``rge eval mmeb``: evaluate, then print the report."""
    from ..eval import mmeb

    options = load_options(args)
    check_input_folder(Path(args.images), "--images")
    check_output_folder(Path(args.output))
    known_before_loading = {"reason": not args.no_reason, "max_new_tokens": args.max_new_tokens, **pixel_budget(args)}
    try:
        subsets = mmeb.resolve_subsets(Path(args.data), args.subsets)
        mmeb.check_output(args.output, known_before_loading)
    except (ValueError, FileNotFoundError) as error:
        raise CLIError(str(error)) from None
    encoder = load_encoder(args.model, options)
    try:
        summary = mmeb.evaluate(encoder, args.data, args.images, args.output, subsets, reason=not args.no_reason,
                                batch_size=args.batch_size)  # fmt: skip
    except mmeb.RGESettingsError as error:
        raise CLIError(str(error)) from None
    print(mmeb.format_table(summary))
    print(f"results in {args.output}")
    return EXIT_OK


def run_encode(args: argparse.Namespace) -> int:
    """``rge encode``: stream the input into shards, resuming from what ``--output`` already holds."""
    from ..corpus import Fields, RGEJobError, check_job, encode_corpus, local_encode_rows
    from ..loading import read_generation_settings

    options = load_options(args)
    settings = {
        "model": args.model, "side": args.side, "dtype": args.dtype, **pixel_budget(args),
        "max_new_tokens": args.max_new_tokens if args.side == "query" else None,
    }  # fmt: skip
    fields = Fields(id=args.id_field, text=args.text_field, image=args.image_field, ignore=args.ignore_fields)
    settings["fields"] = {"id": fields.id, "text": fields.text, "image": fields.image}
    if args.side == "query":
        try:
            generation = read_generation_settings(args.model, repetition_penalty=args.repetition_penalty)
        except Exception as error:
            raise (model_error(error, args.model) or error) from None
        settings["generation"] = generation.as_dict()
    try:
        check_job(args.input, args.output, settings, fields)
    except RGEJobError as error:
        raise CLIError(str(error)) from None
    if args.ray:
        from ..integrations.ray import ray_encode_rows

        encode_rows = ray_encode_rows(args.model, args.side, args.batch_size, workers=args.workers,
                                      address=args.ray_address, load_kwargs=options)  # fmt: skip
    else:
        encode_rows = local_encode_rows(load_encoder(args.model, options), args.side, args.batch_size)
    try:
        report = encode_corpus(args.input, args.output, settings, encode_rows, chunk_size=4 * args.batch_size,
                               shard_size=args.shard_size, fields=fields)  # fmt: skip
    except RGEJobError as error:
        raise CLIError(str(error)) from None
    except KeyboardInterrupt as interrupt:  # --debug shows where it stopped
        raise CLIError("interrupted; rerun the same command to resume (finished shards are kept)",
                       EXIT_INTERRUPTED) from interrupt  # fmt: skip
    print(f"encoded {report.encoded} of {report.rows} rows into {report.shards} shards in {report.output}")
    if report.failed:
        raise CLIError(f"{report.failed} rows failed; see {report.output / 'errors.jsonl'}", EXIT_ROWS_FAILED)
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    """Reason about the query image, embed the two candidates, print rationale and cosine scores."""
    options = load_options(args)
    if args.image is not None and not Path(args.image).is_file():
        raise CLIError(f"--image {args.image!r} is not a file")
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if args.tiny:
            from ..testing import build_tiny_checkpoint

            model = str(build_tiny_checkpoint(scratch))
        encoder = load_encoder(model, options, offer_tiny=not args.tiny)
        picture = args.image if args.image is not None else demo_picture()
        query, rationale = encoder.encode_query(DEMO_QUERY, images=[picture], return_rationales=True)
        candidates = encoder.encode_document(DEMO_CANDIDATES)
        scores = encoder.similarity(query, candidates)[0]
    print(f"model:     {'tiny random checkpoint (--tiny)' if args.tiny else model}")
    print(f"query:     [image: {args.image or 'drawn picture'}] {DEMO_QUERY.strip()}")
    print(f"rationale: {rationale!r}")
    for text, score in zip(DEMO_CANDIDATES, scores):
        print(f"{score:.4f}  {text}")
    return EXIT_OK


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
