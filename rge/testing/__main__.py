"""``python -m rge.testing tiny PATH``: build a tiny random RGE checkpoint, offline, in a few seconds.

Pass ``PATH`` wherever a model is named (``--model PATH``, ``RGEEncoder.from_pretrained(PATH)``) to run
any example without the hub; its vectors and rationales are random, its shapes and files the real ones.
``python -m rge.testing tiny-base PATH`` builds the base model instead (Qwen2.5-VL-Instruct's files, no
``<emb>``), to try ``rge train --model PATH``, which adds ``<emb>``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import build_tiny_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rge.testing", description="Run rge offline.")
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny", help="write a tiny random RGE-shaped checkpoint to PATH")
    base = commands.add_parser("tiny-base", help="write a tiny random base checkpoint (no <emb>) for rge train")
    for command in (tiny, base):
        command.add_argument("path", metavar="PATH", help="folder to write (created if missing)")
        command.add_argument(
            "--layout", choices=["transformers4", "transformers5"], default="transformers4",
            help="the published checkpoint's files (default) or those of transformers 5.x",
        )  # fmt: skip
    args = parser.parse_args(argv)
    if os.path.exists(args.path) and not os.path.isdir(args.path):
        parser.error(f"{args.path!r} is a file; give a folder")
    if args.command == "tiny-base":
        path = build_tiny_checkpoint(args.path, layout=args.layout, with_emb_token=False)
        print(f"tiny random base checkpoint (no <emb>) in {path}; train from it with rge train --model {path}")
        return 0
    path = build_tiny_checkpoint(args.path, layout=args.layout)
    print(f"tiny random checkpoint in {path}; pass it as --model {path} or RGEEncoder.from_pretrained({str(path)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
