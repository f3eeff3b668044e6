"""The exceptions rge raises on purpose: one family, ``RGEError``, each with a message that says what to do.

``except RGEError`` catches every one of them. Each also keeps the built-in base callers caught before the
family existed (``RGEInputError`` is a ``ValueError``, ``RGEMissingExtraError`` an ``ImportError``, ...).
The server's HTTP errors (``rge.serving``: ``APIError``, ``ImageRejected``, ``BodyTooLarge``) and the
command line's ``CLIError`` belong to the family too, but live beside the code that answers them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ._about import DISTRIBUTION


class RGEError(Exception):
    """The base of every exception rge raises on purpose."""


class RGEInputError(RGEError, ValueError):
    """An input item, or an option, cannot be used. The message names the item index and the problem.

    Raised before any model work, so the encoder stays usable after it.
    """

    def __init__(self, message: str, index: int | None = None, part: str | None = None) -> None:
        self.index = index
        """The item at fault (None when the call as a whole is)."""
        self.part = part
        """The part of the item at fault, when it is one part: ``"image"``."""
        self.reason = message
        """The message without the item prefix."""
        super().__init__(message if index is None else f"item {index}: {message}")


class RGECheckpointError(RGEError, ValueError):
    """A checkpoint cannot be used as an RGE model (missing files, no ``<emb>`` token, ...)."""


class RGEModelNotFoundError(RGECheckpointError, FileNotFoundError):
    """A model name is neither a local checkpoint directory nor a hub repository that can be downloaded now
    (misspelt, offline without a cached copy, private, gated). The message says which; the hub's own error
    is chained."""


class RGEMissingExtraError(RGEError, ImportError):
    """A feature needs an optional extra that is not installed; the message is the ``pip install`` command."""


class RGEDataError(RGEError, ValueError):
    """A data set rge reads does not have the files, columns or column types it must have."""


class TrainingDataError(RGEDataError):
    """The training data cannot be used at all (no file, an unknown format, no usable row)."""


class TrainingSetupError(RGEError, ValueError):
    """The run cannot start as configured (output folder, resume, extras); nothing was trained."""


class RGEJobError(RGEError, ValueError):
    """An output folder cannot be used for this job (other settings, unfinished, not an rge index)."""


class RGESettingsError(RGEError, ValueError):
    """The output folder holds results made with other settings."""


def require_extra(module: str, *, extra: str, needed_by: str) -> ModuleType:
    """Import ``module``, or raise ``RGEMissingExtraError`` with the command that installs ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        command = f'pip install "{DISTRIBUTION}[{extra}]"'
        top = module.partition(".")[0]
        missing = isinstance(error, ModuleNotFoundError) and error.name in (module, top)
        detail = "" if missing else f" (it is installed but does not import: {error})"
        raise RGEMissingExtraError(f"{needed_by} needs {top}: {command}{detail}", name=module) from error
