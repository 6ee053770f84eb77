"""What every dataset release gives ``prepare``: one small interface, one module per dataset.

A :class:`Release` turns a folder laid out as its owners publish it into a :class:`Plan` (the
volumes to write, their splits and report texts), names the preprocessing its volumes get (per
source, :class:`~med3dvlm.data.preprocess.Preprocessing`), and may write further outputs once the
volumes exist (M3D's rewritten VQA CSVs, FLARE's case records, CT-RATE's labels). The engine
(:mod:`med3dvlm.data.preparation`) does the rest the same way for every dataset: workers, bounded
reads, atomic writes, resume, lock, split lists, manifest.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from med3dvlm.data.errors import DataError
from med3dvlm.data.preprocess import Preprocessing, WindowSpec

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
OnError = Literal["fail", "skip"]
JobKind = Literal["series", "scan"]


class ErrorPolicy:
    """Raise bad-input errors (``fail``) or record them as skipped (``skip``)."""

    def __init__(self, on_error: OnError) -> None:
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[dict[str, str]] = []

    def handle(self, source: str, error: DataError) -> None:
        if self.on_error == "fail":
            raise error
        log.warning("skipped %s: %s", source, error)
        self.skipped.append({"source": source, "reason": str(error)})


def split_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validate train/validation/test fractions (non-negative, summing to 1)."""
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; use {list(SPLITS)}")
    values = {name: float(fractions.get(name, 0.0)) for name in SPLITS}
    if min(values.values()) < 0 or abs(sum(values.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {values}")
    return values


def hash_split(key: str, fractions: Mapping[str, float]) -> str:
    """Deterministic split of ``key``: its SHA-256 mapped to [0, 1) against the cumulative fractions."""
    position = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    cumulative = 0.0
    for name in SPLITS:
        cumulative += fractions[name]
        if position < cumulative:
            return name
    return next(name for name in reversed(SPLITS) if fractions[name] > 0)


@dataclass(frozen=True)
class PrepareOptions:
    """The settings of one ``prepare`` run that a release reads (``extra``: its own, ``dataset.*``)."""

    format: str = "nii.gz"
    npy_dtype: str = "uint8"
    spatial_size: tuple[int, int, int] = (128, 256, 256)
    fractions: Mapping[str, float] = field(
        default_factory=lambda: {"train": 0.9, "validation": 0.05, "test": 0.05}
    )
    window: WindowSpec = None
    foreground_threshold: float = 0.0
    strict_split: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VolumeJob:
    """One volume to prepare: an M3D-Cap slice folder or a scan (``data.scans``) of a named source."""

    source: str  # absolute path read by the worker
    label: str  # how the manifest names the source
    kind: JobKind
    output: str  # prepared path relative to OUT
    source_name: str  # the key of its recipe in Preprocessing.sources
    rescale: tuple[float, float] | None = None  # (slope, intercept) to apply to the stored values
    spacing: tuple[float, float, float] | None = None  # (D, H, W) mm where the header's is not to be trusted
    stored_order: bool = False  # read in the file's own voxel order, whatever the recipe's orientation


@dataclass
class Plan:
    """Everything to do, decided before any volume is touched."""

    jobs: list[VolumeJob]
    split_of: dict[str, str] = field(default_factory=dict)  # output -> split
    text_of: dict[str, str] = field(default_factory=dict)  # output -> report path relative to OUT
    texts: dict[str, str] = field(default_factory=dict)  # report path relative to OUT -> report text
    split_source: str = "hash"
    listed: dict[str, list[str]] = field(default_factory=dict)  # split-file list -> outputs, in its order
    group_of: dict[str, str] = field(default_factory=dict)  # output -> collection / source, for the counts
    case_of: Callable[[str], str] = str  # output -> the case (patient) whose volumes share a split
    duplicates: list[list[str]] = field(default_factory=list)  # sources with identical bytes
    hu_unwindowed: int = 0  # raw-HU scans min-maxed for want of a window
    orientations: dict[str, str] = field(default_factory=dict)  # source -> the voxel order its files store


Finish = Callable[
    [Path, Path, Plan, Mapping[str, Any], dict[str, list[dict[str, str]]], ErrorPolicy, PrepareOptions],
    dict[str, Any],
]


@dataclass(frozen=True)
class DatasetLicence:
    """A release's licence as the Hugging Face Hub names licences (``apache-2.0``, ``cc-by-nc-sa-4.0``,
    ``other``), its dataset ids on the Hub, and a note for the reader of a model card."""

    licence: str = "other"
    hub_ids: tuple[str, ...] = ()
    note: str = "licence not known"


@dataclass(frozen=True)
class Release:
    """A dataset as its owners publish it: how ``prepare`` reads it (``dataset=<name>``)."""

    name: str
    summary: str
    preprocessing: Callable[[PrepareOptions], Preprocessing]
    """The recipe of each source (a source read in its files' own order has orientation ``None``: the
    order they store, found while planning, is recorded in the manifest)."""
    plan: Callable[[Path, PrepareOptions, ErrorPolicy], Plan]
    finish: Finish | None = None
    """Outputs written once the volumes exist; returns what the manifest adds (``{key: value}``)."""
    caption_file: str = "M3D_Cap.json"
    """The split file of ``{"image", "text"}`` lists that ``prepare`` writes (what stage 1 reads)."""
    options: Sequence[str] = ()
    """The ``dataset.*`` settings it reads."""
    corpus: Callable[[Path], list[str]] | None = None
    """Every text of a prepared folder a tokenizer trained on it should know (default: its reports)."""
    prompt_format: str = "m3d"
    """How prompts on this data are written (``data.prompts.PROMPT_FORMATS``)."""
    tasks: Mapping[str, type] = field(default_factory=dict)
    """The sample datasets of the VLM stages by task name (``data.datasets.VLMDataset`` subclasses)."""
    mixtures: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Which tasks each stage's mixture (``retrieval``, ``pretrain``, ``finetune``) trains on."""
    synthetic: Callable[..., Any] | None = None
    """Writes a miniature release of this layout: ``(out, cases, seed, slices, size, workers, **options)``."""
    synthetic_options: Sequence[str] = ()
    """The settings of ``python -m med3dvlm.synthetic`` its miniature takes beyond those."""
    licence: DatasetLicence = DatasetLicence()
    """What a model card says a model trained on it is under."""
