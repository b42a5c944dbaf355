"""Errors raised by dist_ckpt.

Every error derives from :class:`DistCkptError`. Specific errors also inherit
the built-in exception they resemble, so ``except FileNotFoundError`` or
``except ValueError`` keep working for callers that do not know this library.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:
    from .flatten import KeyPath


class DistCkptError(Exception):
    """Root of every error raised by dist_ckpt."""


class CheckpointError(DistCkptError):
    """A save (or load) failed on one or more ranks.

    Raised on *every* rank with the same text. ``failures`` maps each failed
    rank to its cause, as reported to the coordinator.
    """

    def __init__(self, message: str, failures: Mapping[int, str] | None = None) -> None:
        self.failures: dict[int, str] = dict(failures or {})
        if self.failures:
            lines = [f"  rank {r}: {m}" for r, m in sorted(self.failures.items())]
            message = message + "\n" + "\n".join(lines)
        super().__init__(message)


class CheckpointExists(CheckpointError, FileExistsError):
    """A committed checkpoint is already at the path and ``overwrite`` was not given.

    Raised on every rank of the save (a :class:`CheckpointError` with the same
    text), and by :class:`~dist_ckpt.CheckpointManager` for a step directory
    that holds something else.
    """


class PlanError(CheckpointError):
    """The ranks' descriptions cannot form one checkpoint (coordinator side).

    ``key`` is the offending key path and ``ranks`` the ranks involved.
    """

    def __init__(self, message: str, key: "KeyPath | None" = None, ranks: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.key = key
        self.ranks = tuple(ranks)


class CheckpointProcessError(DistCkptError):
    """The checkpoint subprocess failed or died, or process mode cannot start (no main guard)."""


class CheckpointNotFound(DistCkptError, FileNotFoundError):
    """No committed checkpoint at the path (absent, or incomplete: no MANIFEST)."""


class ManifestError(DistCkptError, ValueError):
    """A MANIFEST is malformed, of an unknown version, or inconsistent."""


class FragmentError(ManifestError):
    """A version-2 fragment (a rank's chunk records) is missing, corrupt (size or xxh3 not the MANIFEST's) or inconsistent with the MANIFEST."""


class ChecksumError(DistCkptError, ValueError):
    """Bytes read from a data file do not match the checksum in the manifest."""


class DataFileError(DistCkptError, OSError):
    """A data file is missing, truncated or unreadable."""


class UnsafeFileError(DistCkptError, OSError):
    """A checkpoint file is a symbolic link, not a regular file (a FIFO, a device, a
    directory), or larger than a reader accepts: refused before any byte is read."""


class StorageError(DistCkptError, OSError):
    """Writing to or reading from the storage backend failed."""


class CoordinatorTimeout(DistCkptError, TimeoutError):
    """A wait on the coordinator (or on other ranks through it) ran out of time."""


class WireError(DistCkptError, ValueError):
    """A coordinator message is malformed, unauthenticated or too large."""


#: Every value ``BadMessage.reason`` can take.
WIRE_REASONS = ("frames", "size", "mac", "header", "version", "type", "field", "rank")


class BadMessage(WireError):
    """A coordinator message was refused; ``reason`` is one of :data:`WIRE_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in WIRE_REASONS, reason
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class StateDictError(DistCkptError, TypeError):
    """A state dict holds a value or key that cannot be checkpointed."""


class PickleNotAllowed(StateDictError):
    """Pickling was needed (on save or load) but the caller did not opt in."""


class LoadMismatchError(DistCkptError, KeyError):
    """The target state dict does not match the checkpoint (keys, shapes, dtypes)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep messages readable
        return str(self.args[0]) if self.args else ""


class ConvertError(DistCkptError, ValueError):
    """The source cannot be expressed in the target format (names the key and why)."""


class CommitOutcomeUnknown(CheckpointError):
    """The coordinator had started committing a save when this rank lost track of it.

    The save may or may not be committed: check the path (``MANIFEST`` present
    means committed) instead of treating the save as failed.
    :class:`~dist_ckpt.CheckpointManager` does this itself.
    """


class CheckpointChanged(DistCkptError):
    """The checkpoint was replaced (overwritten) while it was being loaded, on every retry."""


class RequeueError(DistCkptError, RuntimeError):
    """Requeueing the job failed (under Slurm: ``scontrol`` missing or refused)."""


class ProcessGroupNotInitialized(DistCkptError, RuntimeError):
    """A launched job (``WORLD_SIZE > 1``) saves before ``init_process_group``."""


class UnsupportedScheme(DistCkptError, ValueError):
    """A checkpoint URL's scheme has no registered storage backend."""


class TransportError(DistCkptError, ConnectionError):
    """The coordinator link cannot be secured (e.g. libzmq without CURVE)."""


class PeerError(DistCkptError, ConnectionError):
    """A node-local tier peer (another rank's peer service) failed, refused a request or did not answer in time.

    Attributes:
        rank: the peer's rank.
        file: the file (or step) the request was about ("" for none).
        what: what went wrong.
    """

    def __init__(self, rank: int, file: str, what: str) -> None:
        self.rank, self.file, self.what = rank, file, what
        # errno EREMOTEIO: code that reports an OSError's errno (the writer's StorageError) names a remote failure
        super().__init__(errno.EREMOTEIO, f"peer rank {rank}{f' ({file})' if file else ''}: {what}")

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type, tuple[int, str, str]]:  # picklable across processes (a rank's error comes back to a test)
        return type(self), (self.rank, self.file, self.what)


class SecretError(DistCkptError, PermissionError):
    """The job secret is missing, or its key file is not safe to trust (owner, mode, type)."""


#: Errors that an ``Aborted`` message may name (``Aborted.error``), so that every
#: rank raises the type the failure deserves instead of a plain CheckpointError.
ABORT_ERRORS: dict[str, type[CheckpointError]] = {"CheckpointExists": CheckpointExists}


# -- error text ------------------------------------------------------------------


def bounded_repr(value: object, width: int = 60) -> str:
    """A short repr of a possibly untrusted value, for error text.

    ``repr`` of decoded garbage may be huge or, nested deeply, raise
    RecursionError (an int past ``sys.get_int_max_str_digits()`` raises too),
    so only plain scalars are shown by value, cut to ``width`` characters;
    anything else by its type's name.
    """
    if type(value) is int and value.bit_length() > 128:
        return "a huge int"
    if type(value) in (str, bytes, int, float, bool, type(None)):
        text = repr(value)
        return text if len(text) <= width else text[: width - 3] + "..."
    return type(value).__name__
