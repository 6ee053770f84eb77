"""Atomic writes: a killed process never leaves a half-written file or folder behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffixes (``.nii.gz``, ``.npy``) so writers that infer the
    format from the name behave, and it starts with ``.tmp-`` so readers can ignore leftovers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates owner-only files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, record: str | tuple[str, ...]) -> Iterator[Path]:
    """Yield an empty staging folder beside ``folder``; when the block succeeds it replaces ``folder``.

    A reader finds the previous folder or the whole new one, never a half-written one: the previous
    one is moved aside first (a crash in between leaves either), then removed. A failed block leaves
    ``folder`` as it was. Staging names start with ``.tmp-`` / ``.old-`` so searches skip them.
    ``record`` names the file (or files) that mark a folder of this kind: an existing ``folder`` is
    replaced only if it holds one or is empty, so a mistyped destination never deletes anything else.
    """
    folder = Path(folder)
    records = (record,) if isinstance(record, str) else record
    if folder.is_dir() and any(folder.iterdir()) and not any((folder / name).is_file() for name in records):
        raise FileExistsError(
            f"{folder}: exists and is not a folder this writes (no {records[0]}); "
            "refusing to replace it: choose another destination or remove it"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's folder is owner-only, as mkdir's would not be
        retired = None
        if folder.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=folder.parent))
            os.replace(folder, retired / folder.name)
        os.replace(staging, folder)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_staging(path: Path) -> bool:
    """Whether ``path`` lies inside a folder :func:`atomic_folder` or :func:`atomic_path` is writing."""
    return any(part.startswith((".tmp-", ".old-")) for part in path.parts)
