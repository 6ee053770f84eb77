"""Planning FLARE 2025 Task 5 (``dataset=flare``): one volume per case record, its report text (the
serialised findings), its split; then the case records written beside the volumes.

Splits: the training JSONs are ``train``; ``val.json`` is the set the challenge and the original's
authors report on (its test set is not released), so it is both ``validation`` and ``test``.
Prepared layout: ``FLARE/<images folder>/<stem>.<format>`` and ``<stem>.txt`` (the report), and
``FLARE/<json stem>.json``: the release's records unchanged but ``case_id`` (``<stem>.npy`` as the
original's ``*_processed.json``), plus ``image`` (the prepared volume), ``report`` (its text file or
``null``) and ``source``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from med3dvlm.data.errors import DataError
from med3dvlm.data.preprocess import Preprocessing
from med3dvlm.data.releases.base import ErrorPolicy, Plan, PrepareOptions, VolumeJob
from med3dvlm.data.releases.flare.layout import (
    LISTINGS,
    listing_file,
    read_listing,
    serialise_findings,
    source_of,
)
from med3dvlm.data.releases.flare.recipe import flare_preprocessing
from med3dvlm.data.scans import stored_orientation
from med3dvlm.data.volume_io import volume_suffix
from med3dvlm.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

PREFIX = "FLARE"
"""Files whose header is read per source, to learn the voxel order the source stores."""


def preprocessing(options: PrepareOptions) -> Preprocessing:
    """The reference's two recipes; their windows are the reference's, not a setting."""
    if options.window is not None:
        raise ValueError(
            "dataset=flare: each source has the reference's window (abdomen [-160, 240], chest "
            "[-1350, 150]); intensity.window is not a setting here"
        )
    return flare_preprocessing()


@dataclass
class FlarePlan(Plan):
    """A plan with the case records to write once the volumes exist."""

    # json stem -> its records (with image, report and source added); split -> the json stems it holds
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    stems: dict[str, list[str]] = field(default_factory=dict)


def _stem(case_id: str) -> str:
    name = Path(case_id).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def plan_flare(root: Path, options: PrepareOptions, policy: ErrorPolicy) -> FlarePlan:
    """Jobs for every case of every JSON of the release at ``root``."""
    plan = FlarePlan([], split_source="release")
    lists: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    sources: dict[str, list[Path]] = {}
    found = [(listing, listing_file(root, listing)) for listing in LISTINGS]
    if not any(path for _, path in found):
        raise DataError(
            root,
            "not a FLARE-Task5-MLLM-3D folder: none of " + ", ".join(l.json for l in LISTINGS) + " found",
        )
    for listing, path in found:
        if path is None:
            log.warning("%s: not found; its cases are left out", root / listing.json)
            continue
        stem = path.name.removesuffix(".json").strip()
        plan.records[stem] = []
        for split in ("validation", "test") if listing.split == "validation" else ("train",):
            plan.stems.setdefault(split, []).append(stem)
        for index, record in enumerate(read_listing(path)):
            where = f"{path} (record {index}, {record['case_id']})"
            image = root / listing.images / record["case_id"]
            try:
                source = source_of(record["case_id"], listing, where)
                if not image.is_file():
                    raise DataError(image, f"not found (listed in {where})")
            except DataError as error:
                policy.handle(str(image.relative_to(root)), error)
                continue
            output = f"{PREFIX}/{listing.images}/{_stem(record['case_id'])}{volume_suffix(options.format)}"
            text = f"{PREFIX}/{listing.images}/{_stem(record['case_id'])}.txt"
            plan.jobs.append(
                VolumeJob(
                    str(image.resolve()),
                    str(image.relative_to(root)),
                    "scan",
                    output,
                    source,
                    stored_order=True,
                )
            )
            findings = record.get("findings") or {}
            if findings:
                plan.texts[text] = serialise_findings(findings)
                plan.text_of[output] = text
            plan.group_of[output] = source
            sources.setdefault(source, []).append(image)
            for split in ("validation", "test") if listing.split == "validation" else ("train",):
                lists[split].append(output)
            plan.records[stem].append(
                {
                    **record,
                    "case_id": f"{_stem(record['case_id'])}.npy",
                    "image": output,
                    "report": text if findings else None,
                    "source": source,
                }
            )
    plan.listed = lists
    plan.orientations = {s: o for s, paths in sources.items() if (o := stored_orientation(paths))}
    return plan


def finish(
    root: Path,
    out: Path,
    plan: FlarePlan,
    volumes: Mapping[str, Any],
    split_lists: dict[str, list[dict[str, str]]],
    policy: ErrorPolicy,
    options: PrepareOptions,
) -> dict[str, Any]:
    """The case records of each JSON whose volume was prepared, and their counts."""
    kept: dict[str, dict[str, int]] = {}
    for stem, records in plan.records.items():
        prepared = [record for record in records if record["image"] in volumes]
        atomic_write_text(
            out / PREFIX / f"{stem}.json", json.dumps(prepared, indent=2, ensure_ascii=False) + "\n"
        )
        kept[stem] = {"cases": len(records), "kept": len(prepared)}
    mismatched = sorted(
        name
        for name, entry in volumes.items()
        if entry.get("stored_axes") not in (None, plan.orientations.get(plan.group_of.get(name)))
    )
    if mismatched:
        log.warning(
            "%d volume(s) store another voxel order than most of their source (kept as stored, as the "
            "reference reads them), e.g. %s",
            len(mismatched),
            mismatched[0],
        )
    return {
        "flare": {
            "records": kept,
            "splits": plan.stems,
            "orientations": plan.orientations,
            "other_voxel_order": mismatched,
        },
        "counts": {"cases_kept": sum(k["kept"] for k in kept.values())},
    }
