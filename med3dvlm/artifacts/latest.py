"""Finding the artifact a step needs: the folder given, else the newest complete one of its kind that
the experiment wrote.

Every artifact folder ends with a JSON record written last (``export.json``, ``handoff.json``): a
folder that has it is complete. :class:`ArtifactKind` says which record and which of its fields
identify a kind; "newest" is by the ``created`` time the record holds (the record file's time for
one written before records carried it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from med3dvlm.configs import work_root
from med3dvlm.utils.atomic import is_staging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArtifactKind:
    """A kind of folder one step writes and a later step reads."""

    name: str
    """As messages name it ("siglip export", "projector hand-off")."""
    record: str
    """The file written last, marking the folder complete."""
    identity: Mapping[str, Any]
    """Fields of the record that every folder of this kind has, with these values."""
    produced_by: str
    """The command that writes it."""
    setting: str
    """The setting that names one explicitly."""

    def matches(self, record: Mapping[str, Any]) -> bool:
        return all(record.get(key) == value for key, value in self.identity.items())


def _created(record_file: Path, record: Mapping[str, Any]) -> float:
    created = record.get("created")
    return float(created) if isinstance(created, int | float) else record_file.stat().st_mtime


def latest(kind: ArtifactKind, experiment: str, root: str | os.PathLike | None = None) -> Path | None:
    """The newest complete folder of ``kind`` written by ``experiment`` under ``root`` (default: the
    work root's ``outputs/``), or ``None``."""
    root = Path(root) if root is not None else work_root() / "outputs"
    found: list[tuple[float, str]] = []
    for record_file in root.glob(f"**/{kind.record}"):
        if is_staging(record_file.relative_to(root)):
            continue
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and kind.matches(record) and record.get("experiment") == experiment:
            found.append((_created(record_file, record), str(record_file.parent)))
    return Path(max(found)[1]) if found else None


def resolve(explicit: str | os.PathLike | None, kind: ArtifactKind, experiment: str,
            root: str | os.PathLike | None = None) -> Path:
    """``explicit`` when given; else the newest folder of ``kind`` by ``experiment`` (named in the log);
    none -> an error naming the command that writes one and the setting that names one."""
    if explicit:
        return Path(explicit)
    found = latest(kind, experiment, root)
    if found is None:
        raise FileNotFoundError(
            f"no completed {kind.name} of experiment {experiment!r} under {root or work_root() / 'outputs'}; "
            f"run `{kind.produced_by}` first or pass {kind.setting}=PATH")
    log.info("using the latest %s of experiment %r: %s", kind.name, experiment, found)
    return found
