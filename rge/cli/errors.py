"""How the command line reports a failure: one line on stderr and a documented exit status.

| status | meaning |
|---:|---|
| 0 | done |
| 1 | an unexpected error (a bug: rerun with ``--debug`` or ``RGE_DEBUG=1`` for the traceback) |
| 2 | bad arguments, input or output folder (nothing was loaded or written) |
| 3 | ``rge encode`` finished, but some rows failed (see ``errors.jsonl``) |
| 4 | the model could not be loaded (not found, not downloadable, not an RGE checkpoint) |
| 5 | an optional extra is missing (the line is the ``pip install`` command) |
| 130 | interrupted |

Any ``rge.errors.RGEError`` a command does not handle itself is reported the same way (``exit_status``).
"""

from __future__ import annotations

from ..errors import RGECheckpointError, RGEError, RGEMissingExtraError, RGEModelNotFoundError

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_ROWS_FAILED = 3
EXIT_MODEL = 4
EXIT_MISSING_EXTRA = 5
EXIT_INTERRUPTED = 130


class CLIError(RGEError):
    """A failure the user can fix, reported as one line with ``status``."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def exit_status(error: RGEError) -> int:
    """The documented exit status of an rge error that ends a command."""
    if isinstance(error, CLIError):
        return error.status
    if isinstance(error, RGEMissingExtraError):
        return EXIT_MISSING_EXTRA
    if isinstance(error, RGECheckpointError):
        return EXIT_MODEL
    return EXIT_USAGE


def model_error(error: BaseException, model: str, *, offer_tiny: bool = False) -> CLIError | None:
    """A one-line explanation of why ``model`` did not load, or None when ``error`` is not about that
    (the library explains it: ``rge.loading.hub_failure``)."""
    tiny = "; or try the offline pipeline with `rge demo --tiny`" if offer_tiny else ""
    if isinstance(error, RGEModelNotFoundError):
        return CLIError(f"{error}{tiny}", EXIT_MODEL)
    if isinstance(error, RGECheckpointError):
        return CLIError(f"cannot use model {model!r}: {error}", EXIT_MODEL)
    return None
