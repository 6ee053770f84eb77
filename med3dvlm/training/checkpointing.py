"""Crash-safe training checkpoints: atomic writes, checksums, a load check, and "last" = the newest
good one.

A checkpoint is a file (``torch.save`` zip) or a directory (a sharded FSDP checkpoint: torch
distributed-checkpoint shards, their ``.metadata`` and Lightning's ``meta.pt``). Each is written with
the SHA-256 of its bytes (``<file>.sha256`` beside a file, ``checksums.json`` inside a folder),
written after the checkpoint itself, so a checkpoint without one is either older than this or was
killed between the two writes (it is then accepted on the other checks). ``resolve_checkpoint``
turns ``ckpt_path=last`` into the newest checkpoint of a folder that passes :func:`check_checkpoint`;
rejected ones are reported in the log, never loaded.

Step checkpoints (:class:`StepCheckpoint`) are never taken just before a validation: a run resumed
from one would skip that validation. Together with the RNG state and the data position stored in
every checkpoint, a resumed run is the uninterrupted run whatever the kill point.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import ModelCheckpoint

from med3dvlm.training.shard_reader import RefusedCheckpointData, read_metadata
from med3dvlm.utils.atomic import atomic_path, atomic_write_text
from med3dvlm.utils.fingerprint import file_sha256, folder_fingerprint, verify_fingerprint

log = logging.getLogger(__name__)


CHECKSUM_SUFFIX = ".sha256"
SHARD_CHECKSUMS = "checksums.json"


def checksum_file(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, fsync, rename, fsync the folder, then
    its SHA-256 beside it: a process killed mid-write leaves the previous checkpoint and at most a
    ``.tmp-*`` leftover."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            digest = file_sha256(tmp)
        _fsync_dir(path.parent)
        atomic_write_text(checksum_file(path), f"{digest}  {path.name}\n")

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        super().remove_checkpoint(path)
        checksum_file(Path(path)).unlink(missing_ok=True)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
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


def check_checkpoint(path: str | os.PathLike, verify_checksum: bool = True) -> CheckpointInfo:
    """Load-check one checkpoint and return its training step; raises :class:`CorruptCheckpoint`.

    A file is opened with ``torch.load(mmap=True, weights_only=True)``: a truncated zip fails at its
    central directory without reading the tensors. A directory needs Lightning's ``meta.pt``
    (written last), a readable ``.metadata`` and every shard file at least as long as the byte
    ranges the metadata lists. ``verify_checksum`` then compares the bytes with the recorded SHA-256
    (a damaged byte anywhere), when one was recorded.
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
    if verify_checksum:
        _verify_checksum(path)
    return CheckpointInfo(path, int(meta["global_step"]), path.stat().st_mtime)


def _verify_checksum(path: Path) -> None:
    try:
        if path.is_dir():
            record = path / SHARD_CHECKSUMS
            if record.is_file():
                verify_fingerprint(path, json.loads(record.read_text(encoding="utf-8")), record)
        elif checksum_file(path).is_file():
            recorded = checksum_file(path).read_text(encoding="utf-8").split()[0]
            if file_sha256(path) != recorded:
                raise ValueError(
                    f"{path}: sha256 differs from the one recorded in {checksum_file(path).name}"
                )
    except (OSError, ValueError, IndexError) as error:  # json.JSONDecodeError is a ValueError
        raise CorruptCheckpoint(f"{path}: checksum check failed ({error})") from error


def write_shard_checksums(folder: str | os.PathLike) -> None:
    """Record the SHA-256 of every file of a finished shard folder (after ``meta.pt``)."""
    folder = Path(folder)
    atomic_write_text(
        folder / SHARD_CHECKSUMS, json.dumps(folder_fingerprint(folder, skip={SHARD_CHECKSUMS}))
    )


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
        raise CorruptCheckpoint(
            f"{folder}: unreadable .metadata ({type(error).__name__}: {error})"
        ) from error
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
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".tmp-")
        and ((p.is_file() and p.suffix == ".ckpt") or (p.is_dir() and _looks_sharded(p)))
    )


def _looks_sharded(folder: Path) -> bool:
    return (
        (folder / ".metadata").exists()
        or (folder / _METADATA_FILENAME).exists()
        or any(folder.glob("*.distcp"))
    )


def latest_valid_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The good checkpoint of ``folder`` with the most training steps (newest file on a tie);
    every rejected one is logged as a warning with its problem. ``None`` if there is none.

    Every candidate gets the cheap checks; checksums are computed newest first, until one holds."""
    good: list[CheckpointInfo] = []
    for path in candidates(folder):
        try:
            good.append(check_checkpoint(path, verify_checksum=False))
        except CorruptCheckpoint as error:
            log.warning("skipping a damaged checkpoint: %s", error)
    for info in sorted(good, key=lambda info: (info.global_step, info.mtime), reverse=True):
        try:
            _verify_checksum(info.path)
        except CorruptCheckpoint as error:
            log.warning("skipping a damaged checkpoint: %s", error)
            continue
        return info.path
    return None


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


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every ``every_n_train_steps`` optimizer steps, never just before a validation.

    Lightning saves the step checkpoint of a step that is followed by a validation before that
    validation runs; a run resumed from it skips the validation (its metrics never appear, the best
    checkpoint may differ). Lightning itself defers the save to the validation's end at the last
    batch of an epoch only; this does it at every step that validates.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and not self._should_skip_saving_checkpoint(trainer):
            epoch_loop = trainer.fit_loop.epoch_loop
            if epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
                self._defer_save_until_validation = True  # ModelCheckpoint saves it at on_validation_end
                return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
