"""Arguments shared by the commands that run a model, and checks that run before anything is loaded."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from pathlib import Path
from typing import Any

from .errors import CLIError


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default (``shown_default``), unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if shown_default(action) is None or "default" in text:
            return action.help
        return f"{text} (default: %(default)s)".lstrip()

    def _split_lines(self, text: str, width: int) -> list[str]:
        """Lines broken at spaces only: ``MCG-NJU/RGE`` and ``--batch-size`` stay whole."""
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def shown_default(action: argparse.Action) -> Any:
    """The default ``--help`` shows for ``action``; None when it has none to show (no value, an empty list, a
    flag, which is off unless given)."""
    default = action.default
    if action.nargs == 0 or default is None or default is argparse.SUPPRESS or default in ((), []):
        return None
    return default


def dataclass_defaults(settings: type) -> dict[str, Any]:
    """The plain defaults of a dataclass's fields (not those a factory computes), by field name: options read
    their defaults from here, so that the command and the Python API cannot disagree."""
    return {field.name: field.default for field in dataclasses.fields(settings)
            if field.default is not dataclasses.MISSING}  # fmt: skip


def positive_int(value: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def positive_float(value: str) -> float:
    """An argparse type: a number above 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be above 0")
    return number


def key_list(value: str) -> tuple[str, ...]:
    """An argparse type: comma-separated names (``img,extra``)."""
    return tuple(name.strip() for name in value.split(",") if name.strip())


def add_model_options(parser: argparse.ArgumentParser, *, batch: bool = True) -> None:
    """The checkpoint and loading options that every model-running command takes."""
    parser.add_argument("--model", default="MCG-NJU/RGE", help="hub id or local checkpoint directory")
    if batch:
        parser.add_argument("--batch-size", type=positive_int, default=16, help="items run together")
        parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="reasoning budget of queries")
        parser.add_argument("--min-pixels", type=positive_int,
                            help="fewest pixels an image is resized to (default: 256*28*28, the paper's)")  # fmt: skip
        parser.add_argument("--max-pixels", type=positive_int,
                            help="most pixels an image is resized to (default: 1024*28*28, the paper's)")  # fmt: skip
        parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, else float32)")
        parser.add_argument(
            "--repetition-penalty",
            type=positive_float,
            help="query decoding (default: the checkpoint's generation config; 1.0: plain greedy)",
        )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """``RGEEncoder.from_pretrained`` keyword arguments from ``add_model_options``' options, checked first."""
    check_device(args.device)
    options: dict[str, Any] = {"device": args.device, "show_progress_bar": args.verbose}
    if hasattr(args, "dtype"):
        check_dtype(args.dtype)
        if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
            raise CLIError(f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}")
        options.update(dtype=args.dtype, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                       max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)  # fmt: skip
    return options


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, before loading anything onto it."""
    from ..errors import RGEInputError
    from ..loading import choose_device

    if device is None:
        return
    try:
        parsed = choose_device(device)
    except RGEInputError as error:
        raise CLIError(f"--{error}") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device {device!r} is not supported; use cpu or cuda")


def check_dtype(dtype: str | None) -> None:
    """Refuse a dtype that is not a floating-point torch dtype, before loading anything."""
    from ..errors import RGEInputError
    from ..loading import choose_dtype

    if dtype is None:
        return
    try:
        choose_dtype(dtype, None)  # type: ignore[arg-type]  # the device only matters for None
    except RGEInputError as error:
        raise CLIError(f"--{error}") from None


def check_output_folder(path: Path) -> None:
    """An output folder may exist (a rerun resumes) but must not be a file."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"--output {str(path)!r} is a file; give a folder (it is created if missing)")


def check_input_folder(path: Path, what: str) -> None:
    if not path.is_dir():
        raise CLIError(f"{what} {str(path)!r} is not a folder")
