"""Finding the artifact a step needs: the folder given, else the newest complete one of its kind that
the experiment wrote.

Every artifact folder ends with its record (``record.json``, :mod:`med3dvlm.artifacts.record`;
older versions wrote ``export.json`` / ``handoff.json`` / ``config.json``): a folder that has one is
complete. :class:`ArtifactKind` says which records identify a kind; "newest" is by the ``created``
time the record holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from med3dvlm.artifacts.record import LEGACY_FILES, RECORD_FILE, ArtifactRecord, RecordError, read_record
from med3dvlm.configs import work_root
from med3dvlm.utils.atomic import is_staging

log = logging.getLogger(__name__)

IMPORTED_ENCODER_DIR = "encoder"
"""Where an imported release keeps its SigLIP encoder export, inside the release's folder."""


@dataclass(frozen=True)
class ArtifactKind:
    """A kind of folder one step writes and a later step reads."""

    name: str
    """As messages name it ("siglip export", "projector hand-off")."""
    kind: str
    """The record's ``kind``."""
    produced_by: str
    """The command that writes it."""
    read_by: str
    """The command that reads it (where :attr:`setting` goes)."""
    setting: str
    """The setting of :attr:`read_by` that names one explicitly."""
    identity: Mapping[str, Any] = field(default_factory=dict)
    """Further record fields every folder of this kind has, with these values."""

    def matches(self, record: ArtifactRecord) -> bool:
        return record.kind == self.kind and all(getattr(record, k) == v for k, v in self.identity.items())


def latest(kind: ArtifactKind, experiment: str, root: str | os.PathLike | None = None) -> Path | None:
    """The newest complete folder of ``kind`` written by ``experiment`` under ``root`` (default: the
    work root's ``outputs/``), or ``None``."""
    root = Path(root) if root is not None else work_root() / "outputs"
    found: list[tuple[float, str]] = []
    folders = {
        path.parent
        for name in (RECORD_FILE, *LEGACY_FILES)
        for path in root.glob(f"**/{name}")
        if not is_staging(path.relative_to(root))
    }
    for folder in folders:
        try:
            record = read_record(folder, quiet=True)
        except (RecordError, OSError):
            continue
        if kind.matches(record) and record.experiment == experiment:
            found.append((record.created, str(folder)))
    return Path(max(found)[1]) if found else None


def resolve(
    explicit: str | os.PathLike | None,
    kind: ArtifactKind,
    experiment: str,
    root: str | os.PathLike | None = None,
) -> Path:
    """``explicit`` when given; else the newest folder of ``kind`` by ``experiment`` (named in the log);
    none -> an error naming the command that writes one and the setting that names one."""
    if explicit:
        return Path(explicit)
    found = latest(kind, experiment, root)
    if found is None:
        raise FileNotFoundError(
            f"no completed {kind.name} of experiment {experiment!r} under {root or work_root() / 'outputs'}; "
            f"run `{kind.produced_by}` first or pass `{kind.setting}=PATH`"
        )
    log.info("using the latest %s of experiment %r: %s", kind.name, experiment, found)
    return found
