"""The ``rge`` command line: ``rge demo``, ``rge eval mmeb``, ``rge encode``, ``rge serve``, ``rge train``.

A user error ends in one line on stderr and a documented exit status (``rge.cli.errors``); ``--debug``
(or ``RGE_DEBUG=1``) shows the traceback instead, for bug reports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from .._about import DISTRIBUTION, __version__
from ..errors import RGEError
from .commands import DEMO_CANDIDATES, DEMO_QUERY, demo_picture, run_demo, run_encode, run_mmeb
from .errors import EXIT_BUG, EXIT_INTERRUPTED, EXIT_USAGE, exit_status
from .options import DefaultsHelpFormatter, add_model_options, key_list, positive_int, shown_default
from .serve import add_serve_parser, run_serve
from .train import add_train_parser, run_train

__all__ = [
    "DEMO_CANDIDATES",
    "DEMO_QUERY",
    "build_parser",
    "demo_picture",
    "main",
    "option_defaults",
]


class _Parser(argparse.ArgumentParser):
    """argparse, with a refusal in one line (and the pointer to --help) instead of the usage block, and each
    option's default in ``--help`` (the commands' parsers are of this class too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rge", description="Reasoning Guided Embeddings for text and images.")
    parser.add_argument("--version", action="version", version=f"rge {__version__} ({DISTRIBUTION})")
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks (also: RGE_DEBUG=1)")
    common.add_argument("--verbose", action="store_true", help="show transformers' loading messages and bars")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", parents=[common], help="encode the paper's demo query against two candidates")
    add_model_options(demo, batch=False)
    demo.add_argument("--tiny", action="store_true", help="use a tiny random checkpoint built offline")
    demo.add_argument("--image", help="image for the query (default: a drawn picture)")

    evaluation = commands.add_parser("eval", help="reproduce a benchmark of the paper").add_subparsers(
        dest="benchmark", required=True
    )
    mmeb = evaluation.add_parser("mmeb", parents=[common], help="MMEB (36 image tasks) with the authors' protocol")
    mmeb.add_argument("--data", required=True, help="local snapshot of TIGER-Lab/MMEB-eval (one folder per subset)")
    mmeb.add_argument("--images", required=True, help="folder the *_img_path values are relative to")
    mmeb.add_argument("--output", required=True, help="results folder (a rerun resumes from it)")
    mmeb.add_argument("--subsets", nargs="+", help="subsets to run (default: all 36)")
    add_model_options(mmeb)
    mmeb.add_argument("--no-reason", action="store_true", help="queries without reasoning (the paper's baseline)")

    encode = commands.add_parser("encode", parents=[common], help="encode a JSONL or parquet corpus into shards")
    encode.add_argument("input", help="JSONL (one object per line: id, text, image) or parquet (.jsonl, .parquet)")
    encode.add_argument("--output", required=True, help="index folder (a rerun resumes from it)")
    encode.add_argument("--side", choices=["document", "query"], default="document",
                        help="query: reason, then embed; document: embed at once")  # fmt: skip
    encode.add_argument("--shard-size", type=positive_int, default=10000, help="rows per output shard")
    encode.add_argument("--id-field", default="id", help="key (JSONL) or column (parquet) of the row id")
    encode.add_argument("--text-field", default="text", help="key or column of the text")
    encode.add_argument("--image-field", default="image", help="key or column of the image (a path, or bytes)")
    encode.add_argument("--ignore-fields", type=key_list, default=(), metavar="KEY,...",
                        help="other keys or columns to leave out (any other is refused)")  # fmt: skip
    add_model_options(encode)
    encode.add_argument("--ray", action="store_true", help=f"run on a Ray cluster (pip install '{DISTRIBUTION}[ray]')")
    encode.add_argument("--ray-address", help="cluster to join (default: start a local one; 'auto' to find one)")
    encode.add_argument("--workers", type=positive_int, default=1, help="Ray actors, each with its own model copy")
    add_serve_parser(commands, common)
    add_train_parser(commands, common)
    return parser


def option_defaults() -> dict[str, dict[str, Any]]:
    """Every command (``"encode"``, ``"eval mmeb"``, ...) with each of its options and the default its ``--help``
    shows (None: it shows none), read from the parser itself."""
    found: dict[str, dict[str, Any]] = {}

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        subcommands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        for action in subcommands:
            for name, subparser in action.choices.items():
                walk(subparser, f"{command} {name}".strip())
        if command and not subcommands:
            found[command] = {max(action.option_strings, key=len): shown_default(action)
                              for action in parser._actions if action.option_strings}  # fmt: skip

    walk(build_parser(), "")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rge`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("RGE_DEBUG", "") not in ("", "0")
    commands = {"demo": run_demo, "eval": run_mmeb, "encode": run_encode, "serve": run_serve, "train": run_train}
    run = commands[args.command]
    name = "rge " + args.command + (f" {args.benchmark}" if args.command == "eval" else "")
    try:
        with _transformers_quiet(not args.verbose):
            return run(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RGEError as error:  # CLIError included
        if debug:
            raise
        print(f"{name}: {' '.join(str(error).split())}", file=sys.stderr)
        return exit_status(error)
    except Exception as error:
        if debug:
            raise
        print(f"{name}: unexpected {type(error).__name__}: {error} (rerun with --debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        return EXIT_BUG


@contextlib.contextmanager
def _transformers_quiet(quiet: bool) -> Iterator[None]:
    """Hide transformers' messages (its load reports) unless ``--verbose`` is given; its loading bar is hidden
    by ``from_pretrained`` itself (``load_options`` asks for it with ``--verbose``)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
