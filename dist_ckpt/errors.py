"""Errors raised by dist_ckpt.

Every error derives from :class:`DistCkptError`. Specific errors also inherit
the built-in exception they resemble, so ``except FileNotFoundError`` or
``except ValueError`` keep working for callers that do not know this library.
"""

from __future__ import annotations

from typing import Mapping


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


class CheckpointExists(DistCkptError, FileExistsError):
    """A committed checkpoint is already at the path and ``overwrite`` was not given."""


class CheckpointNotFound(DistCkptError, FileNotFoundError):
    """No committed checkpoint at the path (absent, or incomplete: no MANIFEST)."""


class ManifestError(DistCkptError, ValueError):
    """A MANIFEST is malformed, of an unknown version, or inconsistent."""


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


class StateDictError(DistCkptError, TypeError):
    """A state dict holds a value or key that cannot be checkpointed."""


class PickleNotAllowed(StateDictError):
    """Pickling was needed (on save or load) but the caller did not opt in."""


class LoadMismatchError(DistCkptError, KeyError):
    """The target state dict does not match the checkpoint (keys, shapes, dtypes)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep messages readable
        return str(self.args[0]) if self.args else ""


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


class SecretError(DistCkptError, PermissionError):
    """The job secret is missing, or its key file is not safe to trust (owner, mode, type)."""
