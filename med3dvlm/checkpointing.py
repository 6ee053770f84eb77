"""Crash-safe training checkpoints: atomic writes, a load check, and "last" = the newest good one.

A checkpoint is a file (``torch.save`` zip) or a directory (a sharded FSDP checkpoint: torch
distributed-checkpoint shards, their ``.metadata`` and Lightning's ``meta.pt``). ``resolve_checkpoint``
turns ``ckpt_path=last`` into the newest checkpoint of a folder that passes :func:`check_checkpoint`;
rejected ones are reported in the log, never loaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.load import _METADATA_FILENAME

from med3dvlm.shard_reader import RefusedCheckpointData, read_metadata
from med3dvlm.utils.atomic import atomic_path

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, fsync, rename, fsync the folder: a
    process killed mid-write leaves the previous checkpoint and at most a ``.tmp-*`` leftover."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(path.parent)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # Checkpoints hold tensors and plain values: never unpickle anything else, whatever the caller asks.
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CorruptCheckpoint(Exception):
    """A checkpoint that fails the load check; the message names the file and the problem."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    global_step: int
    mtime: float


def check_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Load-check one checkpoint and return its training step; raises :class:`CorruptCheckpoint`.

    A file is opened with ``torch.load(mmap=True, weights_only=True)``: a truncated zip fails at its
    central directory without reading the tensors. A directory needs Lightning's ``meta.pt``
    (written last), a readable ``.metadata`` and every shard file at least as long as the byte
    ranges the metadata lists.
    """
    path = Path(path)
    if path.is_dir():
        meta = _load(path / _METADATA_FILENAME, path)
        _check_shards(path)
    elif path.is_file():
        meta = _load(path, path)
    else:
        raise CorruptCheckpoint(f"{path}: no such checkpoint")
    if not isinstance(meta, dict) or "global_step" not in meta:
        raise CorruptCheckpoint(f"{path}: not a Lightning checkpoint (no global_step)")
    return CheckpointInfo(path, int(meta["global_step"]), path.stat().st_mtime)


def _load(file: Path, checkpoint: Path) -> Any:
    if not file.is_file():
        raise CorruptCheckpoint(f"{checkpoint}: {file.name} is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # whatever the parser trips on, the file is unusable
        raise CorruptCheckpoint(f"{file}: unreadable ({type(error).__name__}: {error})") from error


def _check_shards(folder: Path) -> None:
    try:
        metadata = read_metadata(folder)
    except RefusedCheckpointData as error:
        raise CorruptCheckpoint(f"{folder}: .metadata refused: {error}") from error
    except Exception as error:
        raise CorruptCheckpoint(f"{folder}: unreadable .metadata ({type(error).__name__}: {error})") from error
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        shard = folder / name
        if not shard.is_file():
            raise CorruptCheckpoint(f"{folder}: shard {name} is missing")
        if shard.stat().st_size < size:
            raise CorruptCheckpoint(f"{shard}: truncated ({shard.stat().st_size} of at least {size} bytes)")


def candidates(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint files (``*.ckpt``) and sharded checkpoint folders directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".tmp-")
                  and ((p.is_file() and p.suffix == ".ckpt") or (p.is_dir() and _looks_sharded(p))))


def _looks_sharded(folder: Path) -> bool:
    return (folder / ".metadata").exists() or (folder / _METADATA_FILENAME).exists() or any(folder.glob("*.distcp"))


def latest_valid_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The good checkpoint of ``folder`` with the most training steps (newest file on a tie);
    every rejected one is logged as a warning with its problem. ``None`` if there is none."""
    good: list[CheckpointInfo] = []
    for path in candidates(folder):
        try:
            good.append(check_checkpoint(path))
        except CorruptCheckpoint as error:
            log.warning("skipping a damaged checkpoint: %s", error)
    if not good:
        return None
    return max(good, key=lambda info: (info.global_step, info.mtime)).path


def resolve_checkpoint(ckpt_path: str | os.PathLike | None, folder: str | os.PathLike) -> str | None:
    """What ``trainer.fit(ckpt_path=...)`` gets: ``None`` stays ``None``; ``"last"`` becomes the
    newest good checkpoint in ``folder`` (``None`` with a warning when there is none: a fresh start);
    an explicit path must pass the load check."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        found = latest_valid_checkpoint(folder)
        if found is None:
            log.warning("ckpt_path=last: no usable checkpoint in %s; starting from scratch", folder)
            return None
        log.info("resuming from %s", found)
        return str(found)
    try:
        check_checkpoint(ckpt_path)
    except CorruptCheckpoint as error:
        raise CorruptCheckpoint(f"ckpt_path: {error}") from error
    return str(ckpt_path)
