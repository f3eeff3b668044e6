"""How the command line reports a failure: one line on stderr and a documented exit status.

| status | meaning |
|---:|---|
| 0 | done |
| 1 | an unexpected error (a bug: rerun with ``--debug`` or ``RGE_DEBUG=1`` for the traceback) |
| 2 | bad arguments, input or output folder (nothing was loaded or written) |
| 3 | ``rge encode`` finished, but some rows failed (see ``errors.jsonl``) |
| 4 | the model could not be loaded (not found, not downloadable, not an RGE checkpoint) |
| 130 | interrupted |
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_ROWS_FAILED = 3
EXIT_MODEL = 4
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A failure the user can fix, reported as one line with ``status``."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def model_error(error: BaseException, model: str, *, offer_tiny: bool = False) -> CLIError | None:
    """A one-line explanation of why ``model`` did not load, or None when ``error`` is not about that."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    from ..errors import RGECheckpointError

    tiny = "; or try the offline pipeline with `rge demo --tiny`" if offer_tiny else ""
    if isinstance(error, RGECheckpointError):
        return CLIError(f"cannot use model {model!r}: {error}", EXIT_MODEL)
    if isinstance(error, GatedRepoError):
        return CLIError(f"model {model!r} is gated on the hub: request access, then set HF_TOKEN", EXIT_MODEL)
    if isinstance(error, RepositoryNotFoundError):
        return CLIError(
            f"model {model!r} is neither a local checkpoint directory nor a hub repository you can read "
            f"(a private one needs HF_TOKEN){tiny}",
            EXIT_MODEL,
        )
    if isinstance(error, LocalEntryNotFoundError) or _is_connection_error(error):
        return CLIError(
            f"cannot download model {model!r}: the hub cannot be reached and there is no cached copy. "
            f"Connect once to download it (MCG-NJU/RGE is about 7 GB), or pass a local checkpoint with --model{tiny}",
            EXIT_MODEL,
        )
    return None


def _is_connection_error(error: BaseException) -> bool:
    names = {type(e).__name__ for e in (error, error.__cause__, error.__context__) if e is not None}
    return bool(names & {"ConnectError", "ConnectionError", "ConnectTimeout", "OfflineModeIsEnabled"})
