"""dist_ckpt: distributed, multi-rank checkpoints for PyTorch jobs.

Functions (state dict first, like DCP)::

    dist_ckpt.save(state_dict, path)
    stage_f, write_f = dist_ckpt.async_save(state_dict, path)
    dist_ckpt.load(state_dict, path, strict=True)

Classes (path first, like ``torch.distributed.checkpoint._experimental``)::

    ck = dist_ckpt.make_async_checkpointer()
    stage_f, write_f = ck.save(path, state_dict)
    ck.load(path, state_dict)
    ck.close()
"""

from .api import async_save, load, save
from .checkpointer import (
    AsyncCheckpointer,
    Checkpointer,
    CheckpointReader,
    CheckpointStager,
    CheckpointWriter,
    DefaultStager,
    SyncCheckpointer,
    WriterHook,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from .config import Config
from .convert import convert
from .describe import RankLocal, rank_local
from .errors import (
    CheckpointChanged,
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    CheckpointProcessError,
    ChecksumError,
    CommitOutcomeUnknown,
    ConvertError,
    CoordinatorTimeout,
    DataFileError,
    DistCkptError,
    LoadMismatchError,
    ManifestError,
    PickleNotAllowed,
    ProcessGroupNotInitialized,
    StateDictError,
    StorageError,
    UnsupportedScheme,
    WireError,
)
from .loader import LoadInfo
from .manager import CheckpointManager
from .process import CheckpointProcess
from .session import RankInfo
from .tier.restore import RestoreInfo
from .verify import BadChunk, VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "save",
    "async_save",
    "load",
    "LoadInfo",
    "CheckpointManager",
    "RestoreInfo",
    "Config",
    "rank_local",
    "RankLocal",
    "RankInfo",
    "Checkpointer",
    "SyncCheckpointer",
    "AsyncCheckpointer",
    "CheckpointStager",
    "DefaultStager",
    "CheckpointWriter",
    "WriterHook",
    "CheckpointProcess",
    "CheckpointReader",
    "make_sync_checkpointer",
    "make_async_checkpointer",
    "DistCkptError",
    "CheckpointError",
    "CheckpointNotFound",
    "ChecksumError",
    "CoordinatorTimeout",
    "DataFileError",
    "LoadMismatchError",
    "ManifestError",
    "PickleNotAllowed",
    "StateDictError",
    "StorageError",
    "WireError",
    "CommitOutcomeUnknown",
    "CheckpointChanged",
    "ProcessGroupNotInitialized",
    "UnsupportedScheme",
    "verify",
    "VerifyReport",
    "BadChunk",
    "convert",
    "ConvertError",
    "CheckpointExists",
    "CheckpointProcessError",
]
