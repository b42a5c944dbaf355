"""Settings shared by every API, validated once at construction."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

S3_MIN_PART_SIZE = 5 << 20  # S3 refuses smaller parts (all but an object's last)


@dataclass(frozen=True)
class Config:
    """How a checkpointer saves and loads.

    Attributes:
        timeout_s: longest wait for every rank to reach a save and finish it.
        heartbeat_interval_s: how often a rank with a save in flight pings the coordinator.
        heartbeat_timeout_s: silence after which a rank (or the coordinator) counts as dead.
        writer_threads: data files written in parallel per rank.
        reader_threads: parallel ranged reads per rank on load (each walks its
            files in offset order; more streams than a disk likes slow it down).
        verify_checksums: on load, check every chunk read in full against its xxh3 and every
            block a partial read touches against its block sum.
        allow_pickle: store values that are neither tensors nor msgpack-native by pickling
            them, and accept such values on load. Off by default: loading a pickle from an
            untrusted checkpoint can execute code.
        coordinator: ``tcp://host:port`` the coordinator binds; default: the job's interface
            towards ``MASTER_ADDR`` with a free port (``DIST_CKPT_COORDINATOR`` overrides).
        max_message_bytes: largest coordinator message accepted.
        s3_part_size: bytes per multipart part of an ``s3://`` data object (>= 5 MiB, S3's
            minimum); each stream holds up to ``s3_max_in_flight + 1`` parts in memory.
        s3_max_in_flight: parts of one data object uploading at once (each writer thread has its own object).
        format_version: the checkpoint format a save writes (rank 0's setting decides): 2 (the
            default), an index MANIFEST and one fragment of chunk records per rank (docs/format.md
            "Version 2"), or 1, one MANIFEST with every chunk record (still written on request).
            Loads read both.
    """

    timeout_s: float = 600.0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 30.0
    writer_threads: int = 2
    reader_threads: int = 2
    verify_checksums: bool = True
    allow_pickle: bool = False
    coordinator: str | None = None
    max_message_bytes: int = 1 << 30
    s3_part_size: int = 16 << 20
    s3_max_in_flight: int = 4
    format_version: int = 2

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.heartbeat_interval_s <= 0:
            raise ValueError("timeout_s and heartbeat_interval_s must be positive")
        if self.heartbeat_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError(f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must be at least twice heartbeat_interval_s ({self.heartbeat_interval_s})")
        if self.writer_threads < 1 or self.reader_threads < 1:
            raise ValueError("writer_threads and reader_threads must be >= 1")
        if self.s3_part_size < S3_MIN_PART_SIZE or self.s3_max_in_flight < 1:
            raise ValueError(f"s3_part_size must be >= {S3_MIN_PART_SIZE} (S3's smallest part) and s3_max_in_flight >= 1")
        if self.format_version not in (1, 2):
            raise ValueError(f"format_version must be 1 or 2, got {self.format_version!r}")
        if self.coordinator is not None and not self.coordinator.startswith("tcp://"):
            raise ValueError(f"coordinator must look like tcp://host:port, got {self.coordinator!r}")

    @staticmethod
    def from_env(**overrides: object) -> "Config":
        """Defaults, then ``DIST_CKPT_*`` environment variables, then ``overrides``.

        Every field has its variable: ``DIST_CKPT_`` + the field name in upper
        case (``DIST_CKPT_ALLOW_PICKLE=1``); booleans accept 1/0, true/false,
        yes/no, on/off. An override of None keeps the environment's value.

        Raises:
            ValueError: a variable's value does not parse; names the variable.
            TypeError: an override names no setting.
        """
        env: dict[str, object] = {}
        for f in fields(Config):
            var = f"DIST_CKPT_{f.name.upper()}"
            raw = os.environ.get(var, "").strip()
            if raw:
                env[f.name] = _parse(var, raw, _CASTS[f.name])
        env.update({k: v for k, v in overrides.items() if v is not None})
        return Config(**env)  # type: ignore[arg-type]


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(var: str, raw: str) -> bool:
    """``raw`` as a boolean (1/0, true/false, yes/no, on/off; any case).

    Raises:
        ValueError: anything else; names ``var``.
    """
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"{var}={raw!r} is not a boolean (use one of {', '.join(_TRUE + _FALSE)})")


def _parse(var: str, raw: str, cast: type) -> object:
    if cast is bool:
        return parse_bool(var, raw)
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a valid {cast.__name__}") from None


# The type of each field as written in the environment (the annotations are strings here).
_CASTS: dict[str, type] = {
    "timeout_s": float,
    "heartbeat_interval_s": float,
    "heartbeat_timeout_s": float,
    "writer_threads": int,
    "reader_threads": int,
    "verify_checksums": bool,
    "allow_pickle": bool,
    "coordinator": str,
    "max_message_bytes": int,
    "s3_part_size": int,
    "s3_max_in_flight": int,
    "format_version": int,
}
