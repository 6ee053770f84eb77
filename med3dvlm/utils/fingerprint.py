"""SHA-256 fingerprints of files and folders: recorded when an artifact is written, checked when it
is read, so a changed, truncated or swapped file is named before anything loads it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Mapping
from pathlib import Path

_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[str]:
    """Every file below ``folder`` as a sorted POSIX path relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def folder_fingerprint(folder: str | os.PathLike, skip: Collection[str] = ()) -> dict[str, str]:
    """``relative path -> sha256`` of every file below ``folder`` except those in ``skip``."""
    folder = Path(folder)
    return {rel: file_sha256(folder / rel) for rel in folder_files(folder) if rel not in skip}


def verify_fingerprint(
    folder: str | os.PathLike,
    recorded: Mapping[str, str],
    record_file: str | os.PathLike,
    closed: Collection[str] = (),
) -> None:
    """Every file ``recorded`` lists must exist with its SHA-256; below each subfolder in ``closed``,
    a file the record does not list is an error too (something reads every file there)."""
    folder = Path(folder)
    for rel, digest in recorded.items():
        path = folder / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {record_file} but missing")
        actual = file_sha256(path)
        if actual != digest:
            raise ValueError(
                f"{path}: sha256 {actual[:16]}... differs from the one recorded in {record_file} "
                f"({digest[:16]}...): the file changed since it was written"
            )
    for sub in closed:
        extra = (
            [rel for rel in folder_files(folder / sub) if f"{sub}/{rel}" not in recorded]
            if (folder / sub).is_dir()
            else []
        )
        if extra:
            raise ValueError(
                f"{folder / sub / extra[0]}: not listed in {record_file} (a file added since the "
                "folder was written)"
            )
