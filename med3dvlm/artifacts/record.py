"""One record per artifact: what it is, what it was trained on, and where it came from.

Every artifact folder (stage 1's encoder export, the projector and adapter hand-offs of stages 2
and 3, a model folder) is written by :func:`write_artifact`: its files first, then
``record.json`` last, the folder built beside its place and renamed into it, so a folder with a
record is complete. The record (:class:`ArtifactRecord`) holds the kind, when it was written, the
volume size, the **preprocessing** of its training data per source (window, voxel order, crop,
resize, and the ``prepare`` settings that made the data), the **prompt format**, the component
configs that rebuild its modules (allow-listed when built, ``models.components``), the SHA-256 of
every other file, and its parents by value (their records and the hash of each record file).

:func:`read_record` is the one place that parses artifact JSON. Artifacts written before records
existed (``export.json``, ``handoff.json``, ``config.json``) are read into a record too, with the
preprocessing of M3D assumed and a log line saying so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from med3dvlm.data.prepared import m3d_preprocessing
from med3dvlm.data.preprocess import Preprocessing
from med3dvlm.utils.atomic import atomic_folder
from med3dvlm.utils.fingerprint import file_sha256, folder_fingerprint, verify_fingerprint

log = logging.getLogger(__name__)

RECORD_FILE = "record.json"
RECORD_VERSION = 2
KINDS: tuple[str, ...] = ("encoder_export", "projector_handoff", "adapter_handoff", "model_folder")
LEGACY_FILES: dict[str, str] = {
    "export.json": "encoder_export",
    "handoff.json": "",
    "config.json": "model_folder",
}
"""The record files older versions wrote, and the kind each held (a hand-off says its own)."""


class RecordError(ValueError):
    """An artifact's record is missing, unreadable or of another kind; the message names the file."""


@dataclass(frozen=True)
class Parent:
    """An artifact this one was built from, by value: its record and the SHA-256 of its record file."""

    role: str
    path: str
    sha256: str | None
    record: ArtifactRecord | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "path": self.path,
            "sha256": self.sha256,
            "record": self.record.to_dict() if self.record else None,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Parent:
        record = values.get("record")
        return cls(
            str(values["role"]),
            str(values["path"]),
            values.get("sha256"),
            ArtifactRecord.from_dict(record) if record else None,
        )


@dataclass(frozen=True)
class ArtifactRecord:
    """What an artifact folder is (see the module docstring); written last, read once."""

    kind: str
    experiment: str
    input_size: tuple[int, int, int]
    preprocessing: Preprocessing
    components: Mapping[str, Mapping[str, Any]]
    """``_target_`` nodes that rebuild the folder's modules (``encoder``; ``vision_tower``, ``projector``)."""
    prompt_format: str | None = None
    """How prompts are written (``med3dvlm.data.prompts.PROMPT_FORMATS``); ``None`` for encoder exports."""
    image_token: str | None = None
    num_image_tokens: int | None = None
    reference_placement: bool = False
    llm: str | None = None
    """The base LLM a hand-off is rebuilt on (a name or a folder)."""
    stage: str | None = None
    which: str | None = None
    """Encoder exports: ``final`` (end of training) or ``best`` (best validation)."""
    trained_embeddings: tuple[str, ...] = ()
    text_pooling: str | None = None
    files: Mapping[str, str] = field(default_factory=dict)
    parents: tuple[Parent, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (an import's source, ...); plain JSON."""
    created: float = field(default_factory=time.time)
    version: int = RECORD_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r}: one of {KINDS}")
        object.__setattr__(self, "input_size", tuple(int(n) for n in self.input_size))
        if len(self.input_size) != 3:
            raise ValueError(f"input_size {list(self.input_size)}: expected (D, H, W)")

    def parent(self, role: str) -> Parent | None:
        return next((p for p in self.parents if p.role == role), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kind": self.kind,
            "created": self.created,
            "experiment": self.experiment,
            "input_size": list(self.input_size),
            "preprocessing": self.preprocessing.to_dict(),
            "prompt_format": self.prompt_format,
            "components": {k: dict(v) for k, v in self.components.items()},
            "image_token": self.image_token,
            "num_image_tokens": self.num_image_tokens,
            "reference_placement": self.reference_placement,
            "llm": self.llm,
            "stage": self.stage,
            "which": self.which,
            "trained_embeddings": list(self.trained_embeddings),
            "text_pooling": self.text_pooling,
            "files": dict(self.files),
            "parents": [p.to_dict() for p in self.parents],
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ArtifactRecord:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown record fields {sorted(unknown)}")
        values = dict(values)
        values["preprocessing"] = Preprocessing.from_dict(values["preprocessing"])
        values["parents"] = tuple(Parent.from_dict(p) for p in values.get("parents", ()))
        values["trained_embeddings"] = tuple(values.get("trained_embeddings", ()))
        return cls(**values)


def write_artifact(
    folder: str | os.PathLike, record: ArtifactRecord, write_files: Callable[[Path], None]
) -> Path:
    """Write (or replace) the artifact ``folder``: ``write_files(staging folder)``, then ``record.json``
    with the SHA-256 of every file written; the folder appears complete or not at all."""
    with atomic_folder(folder, (RECORD_FILE, *LEGACY_FILES)) as staging:
        write_files(staging)
        final = replace(record, files=folder_fingerprint(staging))
        (staging / RECORD_FILE).write_text(json.dumps(final.to_dict(), indent=2) + "\n", encoding="utf-8")
    return Path(folder)


def record_file(folder: str | os.PathLike) -> Path | None:
    """The record file of ``folder`` (``record.json``, or an older version's), or ``None``."""
    folder = Path(folder)
    for name in (RECORD_FILE, *LEGACY_FILES):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise RecordError(f"{path}: expected a JSON object")
    return content


def read_record(
    folder: str | os.PathLike,
    kinds: Sequence[str] | str | None = None,
    verify_files: bool = False,
    quiet: bool = False,
) -> ArtifactRecord:
    """The record of the artifact ``folder`` (a folder of one of ``kinds``, when given).

    ``verify_files`` checks each file the record lists against its SHA-256 (a changed, missing or
    added file is an error naming it). An artifact of an older version gets its record rebuilt
    (module docstring), said in the log unless ``quiet``."""
    folder = Path(folder)
    path = record_file(folder)
    if path is None:
        raise RecordError(
            f"{folder}: no artifact here ({RECORD_FILE} missing); artifacts are written by "
            "`python -m med3dvlm.train`, `export` and `import_weights`"
        )
    content = _load_json(path)
    try:
        record = (
            ArtifactRecord.from_dict(content) if path.name == RECORD_FILE else _legacy(folder, path, content)
        )
        if path.name != RECORD_FILE and not quiet:
            log.warning(
                "%s records no preprocessing (written by an older version): assuming M3D's (min-max of "
                "the volume, display order LPI, foreground crop, trilinear resize); set the window of "
                "infer and the web page if it was trained on other data",
                path,
            )
    except (KeyError, TypeError, ValueError) as error:
        raise RecordError(
            f"{path}: not a med3dvlm artifact record ({type(error).__name__}: {error})"
        ) from error
    wanted = (kinds,) if isinstance(kinds, str) else tuple(kinds or ())
    if wanted and record.kind not in wanted:
        raise RecordError(
            f"{path}: a {record.kind.replace('_', ' ')}, expected a {' or '.join(wanted)}".replace("_", " ")
        )
    if verify_files:
        if record.files:
            verify_fingerprint(folder, record.files, path, closed=_closed_folders(record))
        else:
            log.warning(
                "%s records no file fingerprints (written by an older version); files not verified", path
            )
    return record


def _closed_folders(record: ArtifactRecord) -> list[str]:
    # Every file of a model folder's llm/ is read by Hugging Face: an added one is a change too.
    return ["llm"] if record.kind == "model_folder" else []


def parent(role: str, folder: str | os.PathLike) -> Parent:
    """``folder``'s record as a parent (by value, with the hash of its record file)."""
    path = record_file(folder)
    if path is None:
        raise RecordError(f"{folder}: no artifact here ({RECORD_FILE} missing)")
    return Parent(role, str(Path(folder)), file_sha256(path), read_record(folder))


# ----------------------------------------------------------------------------- older versions


def _legacy(folder: Path, path: Path, meta: Mapping[str, Any]) -> ArtifactRecord:
    """A record for an artifact written before records existed (its preprocessing assumed M3D's)."""
    common = {
        "experiment": str(meta.get("experiment", "default")),
        "input_size": meta["input_size"],
        "preprocessing": m3d_preprocessing(inferred=True),
        "created": float(meta.get("created") or path.stat().st_mtime),
        "version": 1,
    }
    if path.name == "export.json":
        return ArtifactRecord(
            "encoder_export",
            components={"encoder": meta["encoder"]},
            stage=meta.get("stage"),
            which=meta.get("which"),
            text_pooling=(meta.get("text_tower") or {}).get("pooling"),
            **common,
        )
    vlm = {
        "components": {"vision_tower": meta["vision_tower"], "projector": meta["projector"]},
        "prompt_format": "m3d",
        "image_token": meta["image_token"],
        "num_image_tokens": meta["num_image_tokens"],
        "reference_placement": bool(meta["reference_placement"]),
    }
    if path.name == "config.json":
        extra = {k: v for k, v in meta.items() if k in ("imported_from", "import")}
        return ArtifactRecord("model_folder", files=meta.get("files", {}), extra=extra, **vlm, **common)
    kind = {"projector": "projector_handoff", "adapter": "adapter_handoff"}[meta["kind"]]
    parents = [
        _legacy_parent(role, meta[key], folder)
        for role, key in (("encoder", "encoder_export"), ("projector", "pretrain_export"))
        if key in meta
    ]
    return ArtifactRecord(
        kind,
        llm=meta.get("llm"),
        trained_embeddings=tuple(meta.get("trained_embeddings", ())),
        parents=tuple(parents),
        **vlm,
        **common,
    )


def _legacy_parent(role: str, recorded: str, folder: Path) -> Parent:
    """An older hand-off names its parent by path only (relative to where training ran): its record
    by value when that folder is still there."""
    for candidate in (Path(recorded), folder / recorded):
        if record_file(candidate) is not None:
            return Parent(
                role, recorded, file_sha256(record_file(candidate)), read_record(candidate, quiet=True)
            )
    return Parent(role, recorded, None, None)
