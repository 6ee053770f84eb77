"""Synthetic CT-RATE (v1 and v2) with RadGenome-ChestCT's CSVs, in the releases' layout, learnable
from the voxels.

Layout (``datasets.md`` §2.1-2.3 and §3), under ``out``::

    dataset/{train,valid}/<s>_<p>/<s>_<p>_<scan>/<s>_<p>_<scan>_<recon>.nii.gz      v1
    dataset/{train,valid}_fixed/...  (the same names)                               v2
    dataset/radiology_text_reports/{train,validation}_reports.csv
    dataset/metadata/{train,validation}_metadata.csv
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv
    radgenome/{train,validation}_{region_report,vqa_*,case_disorders}.csv

Patients: global index ``i``; every fourth (``i % 4 == 3``) is a validation patient; ids count from
1 within each split, so ``train_1`` and ``valid_1`` are different patients, as in the release.
Patient ``i`` has scans ``a`` and ``b`` when ``i % 3 == 1``, else ``a``; its scan number ``s``
(0-based) has reconstructions 1 and 2 when ``(i + s) % 2 == 0``, else 1. All volumes of a patient
carry the patient's labels; the reconstructions of a scan share its report.

Volumes are int16, stored ``(x, y, z)`` with axis codes L, P, S (voxel index ``i`` runs to the
patient's left, ``j`` posterior, ``k`` superior). Reconstruction diameter 360-400 mm (0.70-0.78 mm
pixels on 512 columns, so ``XYSpacing`` = diameter / ``size``); slice thickness 1, 1.25 or 1.5 mm
on 200 slices (``ZSpacing`` = thickness * 200 / ``slices``). The metadata always says
``RescaleSlope`` 1, ``RescaleIntercept`` -1024. v1 stores HU - intercept (air ~ 0, minimum 0);
v2 stores HU (minimum -1024) under the same metadata, so applying the intercept to v2 shifts it
twice. Outside the reconstruction circle the scan is -1024 HU; air inside is -1000 HU + noise.

Anatomy, in mm from the volume centre (X left, Y posterior, Z superior), shifted up to 3 mm per scan:
body ellipse (fat, muscle wall, mediastinal fat inside), spine, lungs (-850 HU), heart (45 HU),
descending aorta (40 HU). :func:`calibration_region` is exactly :data:`CALIBRATION_HU` (40 HU, no
noise) in every volume: the paraspinal muscle behind the spine, voxel centres with X in
[-24.7, 24.7] mm and Y in [93.3, 111.7] mm, on every slice (0.52 in a [-1000, 1000] window).

The learnable labels (:data:`LEARNABLE`) are drawn into the voxels, each with a density and a place
of its own, at sizes no voxel grid allowed here can miss:

* Cardiomegaly: heart radii x 1.45;
* Pericardial effusion: a 5 HU rim, >= 12 mm thick, around the heart;
* Arterial wall calcification: 800 HU rings on the descending aorta's wall (nothing else > 550 HU);
* Emphysema: lungs at -950 HU instead of -850 HU;
* Lung nodule: a 150 HU ellipsoid, >= 6 mm, in the upper zone (Z > 15 mm) of one lung;
* Pleural effusion: 8 HU filling the posterior base (Y > 27.75 mm, Z < 0) of one or both lungs;
* Consolidation: a 35 HU patch in the anterior lateral mid-zone of one lung.

The other eleven labels are random, stated in the reports but absent from the voxels. A report names
a label (its name, lower-cased, in Findings_EN + Impressions_EN) exactly when it is present. A case
depends only on ``(seed, patient index)``, so output bytes do not depend on ``workers``.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from med3dvlm.data.releases.ctrate.layout import (
    CSV_SPLIT,
    CTRATE_LABELS,
    DATASET_DIR,
    LABEL_COLUMNS,
    METADATA_COLUMNS,
    NOT_GIVEN,
    RADGENOME_COLUMNS,
    RADGENOME_DIR,
    REPORT_COLUMNS,
    SPLITS,
    VERSIONS,
    VOLUME_DIRS,
)
from med3dvlm.utils.atomic import atomic_path, atomic_write_text

RESCALE_INTERCEPT, RESCALE_SLOPE = -1024, 1
CALIBRATION_HU = 40
LEARNABLE: tuple[str, ...] = (
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Emphysema",
    "Lung nodule",
    "Pleural effusion",
    "Consolidation",
)

FOV_MM: tuple[int, ...] = (360, 370, 380, 390, 400)
SLICE_MM: tuple[float, ...] = (1.0, 1.25, 1.5)
REAL_SLICES = 200
NOISE_HU: dict[int, float] = {1: 6.0, 2: 10.0}  # per reconstruction: soft, then sharp kernel
MIN_SIZE, MIN_SLICES = 24, 12  # the calibration block and the lesions need voxels under 17 x 25 mm

_CALIBRATION_MM = ((-24.7, 24.7), (93.3, 111.7))  # X, Y; odd bounds so no voxel centre sits on one
_LUNG_X, _LUNG_Y, _LUNG_RADII = 68.0, 5.0, (48.0, 65.0, 90.0)
_HEART_CENTER, _HEART_RADII, _CARDIOMEGALY = (12.0, -28.0, -40.0), (46.0, 40.0, 44.0), 1.45
_AORTA, _AORTA_R, _SPINE, _SPINE_R = (22.0, 45.0), 13.0, (0.0, 70.0), 18.0
_EFFUSION_Y = _LUNG_Y + 0.35 * _LUNG_RADII[1]
_HU = {
    "air": -1000.0, "outside": -1024.0, "fat": -100.0, "mediastinal fat": -90.0, "muscle": 40.0,
    "bone": 350.0, "lung": -850.0, "emphysema": -950.0, "heart": 45.0, "blood": 40.0,
    "pericardial fluid": 5.0, "pleural fluid": 8.0, "consolidation": 35.0, "nodule": 150.0,
    "calcification": 800.0,
}  # fmt: skip

# (manufacturer, model, filter, series descriptions and kernels of reconstructions 1 and 2)
_VENDORS = (
    ("Philips", "iCT 256", "B", ("HRCT", "LUNG"), ("B", "YC")),
    ("SIEMENS", "SOMATOM Definition Edge", "FLAT", ("THORAX 1.5 Br40", "LUNG 1.5 Bl57"), ("Br40d", "Bl57d")),
    ("PNMS", "Ingenuity CT", "B", ("CHEST", "LUNG"), ("B", "YB")),
)
_HISTORIES = ("Cough.", "Shortness of breath.", "Fever and cough.", "Chest pain.", "Follow-up.")
_REGIONS: tuple[str, ...] = (
    "lung",
    "lung/left lung",
    "lung/right lung",
    "trachea and bronchie",
    "mediastinum",
    "heart",
    "esophagus",
    "pleura",
)
_NORMAL: tuple[tuple[str, str], ...] = (
    ("trachea and bronchie", "The trachea and both main bronchi are patent."),
    ("mediastinum", "Mediastinal structures and the thoracic aorta are of normal appearance."),
    ("heart", "Heart size is normal."),
    ("esophagus", "The esophagus is unremarkable."),
    ("lung", "Both lungs are clear."),
    ("pleura", "The pleural spaces are clear."),
)
# The region a presence question names for an absent label.
_REGION_OF: dict[str, str] = {
    label: region
    for region, labels in {
        "mediastinum": ("Medical material", "Arterial wall calcification", "Lymphadenopathy"),
        "heart": ("Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification"),
        "esophagus": ("Hiatal hernia",),
        "pleura": ("Pleural effusion",),
        "trachea and bronchie": ("Peribronchial thickening", "Bronchiectasis"),
        "lung": (
            "Emphysema",
            "Atelectasis",
            "Lung nodule",
            "Lung opacity",
            "Pulmonary fibrotic sequela",
            "Mosaic attenuation pattern",
            "Consolidation",
            "Interlobular septal thickening",
        ),
    }.items()
    for label in labels
}
_WHOLE = "The examination was evaluated in mediastinal and parenchymal windows."
_CLOSING = (
    ("bone", "Bone structures are intact."),
    ("abdomen", "Upper abdominal organs in the field are unremarkable."),
)


# ----------------------------------------------------------------------------------------------
# Patients


@dataclass(frozen=True)
class Finding:
    """A present label as the report, RadGenome and the voxels describe it."""

    label: str
    anatomy: str  # RadGenome's hierarchical path
    sentence: str  # for Findings_EN
    impression: str  # for Impressions_EN
    size: str | None = None  # RadGenome's "AxB mm", for sized findings


@dataclass(frozen=True)
class Patient:
    """Everything one patient's volumes and texts show; geometry in mm from the volume centre."""

    index: int
    split: str
    pid: int
    scans: tuple[tuple[str, tuple[int, ...]], ...]  # (scan letter, reconstruction numbers)
    sex: str
    age: int
    labels: tuple[int, ...]  # in CTRATE_LABELS order
    findings: tuple[Finding, ...]
    body: tuple[float, float]  # semi-axes X, Y of the body ellipse
    heart_radii: tuple[float, float, float]
    pericardial_mm: float
    nodule: tuple[tuple[float, float, float], tuple[float, float, float]] | None  # centre, radii
    consolidation: tuple[tuple[float, float, float], tuple[float, float, float]] | None
    effusion_sides: tuple[str, ...]
    plaques: tuple[tuple[float, float], ...]  # Z ranges of the calcified aortic wall
    ring_mm: float  # thickness of a calcified ring
    history: str

    @property
    def name(self) -> str:
        return f"{self.split}_{self.pid}"

    def has(self, label: str) -> bool:
        return bool(self.labels[CTRATE_LABELS.index(label)])


def split_and_id(index: int) -> tuple[str, int]:
    """The split of patient ``index`` (every fourth is ``valid``) and its id, counted from 1 per split."""
    if index % 4 == 3:
        return "valid", index // 4 + 1
    return "train", index - (index + 1) // 4 + 1


def scan_plan(index: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Scans and reconstructions of patient ``index`` (see the module docstring)."""
    letters = "ab" if index % 3 == 1 else "a"
    return tuple((letter, (1, 2) if (index + s) % 2 == 0 else (1,)) for s, letter in enumerate(letters))


def _largest_voxel_mm(size: int, slices: int) -> tuple[float, float]:
    return max(FOV_MM) / size, max(SLICE_MM) * REAL_SLICES / slices


def _describe(label: str, rng: np.random.Generator, geometry: dict[str, Any]) -> Finding:
    """The report sentence, impression, RadGenome anatomy and size of a present ``label``."""
    side = geometry["side"]
    lower = f"lung/{side} lung/lower lobe of {side} lung"
    if label == "Lung nodule":
        (a, b), side = geometry["nodule_mm"], geometry["nodule_side"]
        return Finding(
            label,
            f"lung/{side} lung/upper lobe of {side} lung",
            f"A {a}x{b} mm solid lung nodule in the upper lobe of the {side} lung.",
            f"Lung nodule in the upper lobe of the {side} lung.",
            f"{a}x{b} mm",
        )
    if label == "Consolidation":
        (a, b), side = geometry["consolidation_mm"], geometry["consolidation_side"]
        lobe = "middle lobe of right lung" if side == "right" else "upper lobe of left lung"
        return Finding(
            label,
            f"lung/{side} lung/{lobe}",
            f"Consolidation of {a}x{b} mm in the {lobe.replace(' of ', ' of the ')}.",
            "Consolidation, compatible with pneumonia.",
            f"{a}x{b} mm",
        )
    if label == "Pleural effusion":
        sides = geometry["effusion_sides"]
        where = "Bilateral" if len(sides) == 2 else sides[0].capitalize()
        return Finding(
            label,
            "pleura",
            f"{where} pleural effusion layering at the posterior lung base.",
            f"{where} pleural effusion.",
        )
    if label == "Pericardial effusion":
        return Finding(
            label,
            "heart",
            f"Pericardial effusion up to {geometry['pericardial_mm']} mm thick around the heart.",
            "Pericardial effusion.",
        )
    if label == "Lymphadenopathy":
        b = int(rng.integers(11, 18))
        a = b + int(rng.integers(0, 6))
        return Finding(
            label,
            "mediastinum",
            f"Mediastinal lymphadenopathy, the largest node {a}x{b} mm.",
            "Mediastinal lymphadenopathy.",
            f"{a}x{b} mm",
        )
    anatomy, sentence, impression = {
        "Medical material": (
            "mediastinum",
            "Medical material: a central venous catheter with its tip in the superior vena cava.",
            "Medical material (central venous catheter).",
        ),
        "Arterial wall calcification": (
            "mediastinum",
            "Arterial wall calcification in the descending thoracic aorta.",
            "Arterial wall calcification of the aorta.",
        ),
        "Cardiomegaly": ("heart", "Cardiomegaly: the heart is enlarged.", "Cardiomegaly."),
        "Coronary artery wall calcification": (
            "heart",
            "Coronary artery wall calcification along the left anterior descending artery.",
            "Coronary artery wall calcification.",
        ),
        "Hiatal hernia": (
            "esophagus",
            "A hiatal hernia at the lower end of the esophagus.",
            "Hiatal hernia.",
        ),
        "Emphysema": ("lung", "Centrilobular emphysema lowers the attenuation of both lungs.", "Emphysema."),
        "Atelectasis": (
            lower,
            f"Subsegmental atelectasis in the lower lobe of the {side} lung.",
            "Atelectasis.",
        ),
        "Lung opacity": (
            lower,
            f"Ground-glass lung opacity in the lower lobe of the {side} lung.",
            "Lung opacity.",
        ),
        "Pulmonary fibrotic sequela": (
            "lung",
            "Pulmonary fibrotic sequela with linear bands in both lungs.",
            "Pulmonary fibrotic sequela.",
        ),
        "Mosaic attenuation pattern": (
            "lung",
            "Mosaic attenuation pattern in both lungs.",
            "Mosaic attenuation pattern.",
        ),
        "Peribronchial thickening": (
            "trachea and bronchie",
            "Peribronchial thickening in both lower lobes.",
            "Peribronchial thickening.",
        ),
        "Bronchiectasis": (
            "trachea and bronchie",
            "Cylindrical bronchiectasis in the lower lobes.",
            "Bronchiectasis.",
        ),
        "Interlobular septal thickening": (
            "lung",
            "Interlobular septal thickening in both lungs.",
            "Interlobular septal thickening.",
        ),
    }[label]
    return Finding(label, anatomy, sentence, impression)


def sample_patient(seed: int, index: int, slices: int, size: int) -> Patient:
    """Draw patient ``index`` from ``(seed, index)`` alone; lesions are sized for the coarsest grid
    that ``(slices, size)`` allows, so each covers voxel centres on every scan."""
    rng = np.random.default_rng([seed, index])
    xy, z = _largest_voxel_mm(size, slices)
    reach = math.sqrt(2 * xy * xy + z * z)  # a body with all radii >= reach / 2 holds a voxel centre
    labels = tuple(int(rng.random() < (0.4 if name in LEARNABLE else 0.2)) for name in CTRATE_LABELS)
    present = {name for name, flag in zip(CTRATE_LABELS, labels) if flag}
    side = ("left", "right")

    b = max(6, math.ceil(reach)) + int(rng.integers(0, 4))
    a = b + int(rng.integers(0, 6))
    nodule_side = side[rng.integers(2)]
    sign = 1 if nodule_side == "left" else -1
    nodule_center = (
        sign * (_LUNG_X + rng.uniform(-0.25, 0.25) * _LUNG_RADII[0]),
        _LUNG_Y + rng.uniform(0.1, 0.35) * _LUNG_RADII[1],
        rng.uniform(0.45, 0.6) * _LUNG_RADII[2],
    )
    consolidation_side = side[rng.integers(2)]
    sign = 1 if consolidation_side == "left" else -1
    grow = max(1.0, reach / 2 / 18.0)
    consolidation_radii = (18.0 * grow, 26.0 * grow, 28.0 * grow)
    consolidation_center = (
        sign * (_LUNG_X + 0.35 * _LUNG_RADII[0]),
        _LUNG_Y - 0.3 * _LUNG_RADII[1],
        rng.uniform(0.3, 0.45) * _LUNG_RADII[2],
    )
    effusion_sides = (("left", "right"), ("left",), ("right",))[rng.integers(3)]
    pericardial_mm = float(max(12, math.ceil(1.2 * xy)))
    length = max(30.0, 2 * z)
    plaques = tuple((float(c), float(c) + length) for c in sorted(rng.uniform(-90, 50, 2)))
    hx, hy, hz = (
        float(r * (1 + rng.uniform(-0.06, 0.06)) * (_CARDIOMEGALY if "Cardiomegaly" in present else 1))
        for r in _HEART_RADII
    )

    geometry: dict[str, Any] = {
        "nodule_mm": (a, b),
        "nodule_side": nodule_side,
        "consolidation_mm": (round(2 * consolidation_radii[2]), round(2 * consolidation_radii[1])),
        "consolidation_side": consolidation_side,
        "effusion_sides": effusion_sides,
        "pericardial_mm": int(pericardial_mm),
        "side": side[rng.integers(2)],  # of the random lower-lobe findings
    }
    split, pid = split_and_id(index)
    return Patient(
        index=index,
        split=split,
        pid=pid,
        scans=scan_plan(index),
        sex="M" if rng.random() < 0.6 else "F",
        age=int(rng.integers(25, 86)),
        labels=labels,
        findings=tuple(_describe(name, rng, geometry) for name in CTRATE_LABELS if name in present),
        body=(float(rng.uniform(150, 165)), float(rng.uniform(120, 130))),
        heart_radii=(hx, hy, hz),
        pericardial_mm=pericardial_mm,
        nodule=(nodule_center, (a / 2, b / 2, b / 2)) if "Lung nodule" in present else None,
        consolidation=(consolidation_center, consolidation_radii) if "Consolidation" in present else None,
        effusion_sides=effusion_sides if "Pleural effusion" in present else (),
        plaques=plaques if "Arterial wall calcification" in present else (),
        ring_mm=max(3.0, 1.5 * xy),
        history=NOT_GIVEN if rng.random() < 0.5 else _HISTORIES[rng.integers(len(_HISTORIES))],
    )


# ----------------------------------------------------------------------------------------------
# Volumes


@dataclass(frozen=True)
class ScanGeometry:
    """The acquisition of one scan: grid, placement in the scanner, device."""

    letter: str
    fov_mm: int
    slice_mm: float
    shape: tuple[int, int, int]  # (x, y, z)
    shift: tuple[float, float, float]  # of the anatomy, mm
    position: tuple[float, float, float]  # ImagePositionPatient (LPS) of voxel (0, 0, 0)
    vendor: int
    study_date: str
    table_height: float
    current_ma: int

    @property
    def spacing(self) -> tuple[float, float, float]:
        xy = self.fov_mm / self.shape[0]
        return xy, xy, self.slice_mm * REAL_SLICES / self.shape[2]

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> RAS: axes L, P, S, so the first two flip the sign of LPS."""
        sx, sy, sz = self.spacing
        px, py, pz = self.position
        return np.array([[-sx, 0, 0, -px], [0, -sy, 0, -py], [0, 0, sz, pz], [0, 0, 0, 1]], dtype=np.float64)


def sample_scan(seed: int, index: int, number: int, letter: str, slices: int, size: int) -> ScanGeometry:
    """Draw scan ``number`` (0-based) of patient ``index``; later scans come later in time."""
    rng = np.random.default_rng([seed, index, 1, number])
    fov = int(FOV_MM[rng.integers(len(FOV_MM))])
    thickness = float(SLICE_MM[rng.integers(len(SLICE_MM))])
    xy = fov / size
    position = (
        round(-(size - 1) / 2 * xy + rng.uniform(-10, 10), 4),
        round(-(size - 1) / 2 * xy + rng.uniform(-10, 30), 4),
        round(float(rng.uniform(-450, -150)), 4),
    )
    day = np.datetime64("2018-01-01") + int(rng.integers(0, 300)) + 400 * number
    dx, dy, dz = (float(v) for v in rng.uniform(-3, 3, 3))
    return ScanGeometry(
        letter=letter,
        fov_mm=fov,
        slice_mm=thickness,
        shape=(size, size, slices),
        shift=(dx, dy, dz),
        position=position,
        vendor=int(rng.integers(len(_VENDORS))),
        study_date=str(day).replace("-", ""),
        table_height=round(float(rng.uniform(150, 190)), 1),
        current_ma=int(rng.integers(80, 300)),
    )


def axis_mm(n: int, spacing: float) -> np.ndarray:
    """Voxel-centre coordinates in mm from the centre of an axis of ``n`` voxels."""
    return (np.arange(n, dtype=np.float64) - (n - 1) / 2) * spacing


def calibration_region(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[slice, slice, slice]:
    """Index slices ``(x, y, z)`` of the block that holds exactly :data:`CALIBRATION_HU` HU in every
    volume of ``shape`` (x, y, z) and ``spacing`` (mm, e.g. XYSpacing and ZSpacing): the voxel
    centres with X in [-24.7, 24.7] mm and Y in [93.3, 111.7] mm from the volume centre, all slices.
    Non-empty for every grid :func:`generate` writes."""
    boxes = []
    for n, step, (lo, hi) in zip(shape[:2], spacing[:2], _CALIBRATION_MM):
        mm = axis_mm(int(n), float(step))
        inside = np.flatnonzero((mm >= lo) & (mm <= hi))
        boxes.append(slice(int(inside[0]), int(inside[-1]) + 1))
    return boxes[0], boxes[1], slice(0, int(shape[2]))


def render(patient: Patient, scan: ScanGeometry, recon: int, rng: np.random.Generator) -> np.ndarray:
    """The HU volume ``(x, y, z)`` (int16) of one reconstruction: anatomy, findings, noise, calibration."""
    sx, sy, sz = scan.spacing
    nx, ny, nz = scan.shape
    x = (axis_mm(nx, sx) - scan.shift[0])[:, None, None]
    y = (axis_mm(ny, sy) - scan.shift[1])[None, :, None]
    z = (axis_mm(nz, sz) - scan.shift[2])[None, None, :]
    hu = np.full(scan.shape, _HU["air"], dtype=np.float32)

    def ellipsoid(center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
        return ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 + (
            (z - center[2]) / radii[2]
        ) ** 2 <= 1

    def ellipse(center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
        return ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2 <= 1

    def paint(mask: np.ndarray, tissue: str) -> None:
        hu[np.broadcast_to(mask, hu.shape)] = _HU[tissue]

    ax, ay = patient.body
    paint(ellipse((0, 0), (ax, ay)), "fat")
    paint(ellipse((0, 0), (ax - 10, ay - 10)), "muscle")
    paint(ellipse((0, 0), (ax - 25, ay - 25)), "mediastinal fat")
    paint(ellipse(_SPINE, (_SPINE_R, _SPINE_R)), "bone")
    lungs = {
        side: ellipsoid((sign * _LUNG_X, _LUNG_Y, 0.0), _LUNG_RADII)
        for side, sign in (("left", 1), ("right", -1))
    }
    either = lungs["left"] | lungs["right"]
    paint(either, "emphysema" if patient.has("Emphysema") else "lung")
    for side in patient.effusion_sides:
        paint(lungs[side] & (y > _EFFUSION_Y) & (z < 0), "pleural fluid")
    if patient.consolidation:
        paint(ellipsoid(*patient.consolidation) & either, "consolidation")
    if patient.nodule:
        paint(ellipsoid(*patient.nodule) & either, "nodule")
    if patient.has("Pericardial effusion"):
        paint(
            ellipsoid(_HEART_CENTER, tuple(r + patient.pericardial_mm for r in patient.heart_radii)),
            "pericardial fluid",
        )
    paint(ellipsoid(_HEART_CENTER, patient.heart_radii), "heart")
    paint(ellipse(_AORTA, (_AORTA_R, _AORTA_R)), "blood")
    for low, high in patient.plaques:
        ring_r = _AORTA_R + patient.ring_mm
        ring = ellipse(_AORTA, (ring_r, ring_r)) & ~ellipse(_AORTA, (_AORTA_R, _AORTA_R))
        paint(ring & (z >= low) & (z <= high), "calcification")

    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(NOISE_HU[recon])
    # Outside the reconstruction circle (on the volume's own grid) the scanner writes its minimum.
    radius = scan.fov_mm / 2
    rx, ry = axis_mm(nx, sx)[:, None, None], axis_mm(ny, sy)[None, :, None]
    hu[np.broadcast_to(rx * rx + ry * ry > radius * radius, hu.shape)] = _HU["outside"]
    out = np.clip(np.rint(hu), _HU["outside"], 3071).astype(np.int16)
    out[calibration_region(scan.shape, scan.spacing)] = CALIBRATION_HU
    return out


def stored(hu: np.ndarray, version: str) -> np.ndarray:
    """What a version's file holds for HU volume ``hu``: v1 ``HU - intercept``, v2 HU."""
    return (hu - RESCALE_INTERCEPT).astype(np.int16) if version == "v1" else hu


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))  # nibabel's gzip writer stores no name or time: same bytes each run


# ----------------------------------------------------------------------------------------------
# Texts


def _lps(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(repr(round(float(v), 4)) for v in values) + "]"


def metadata_row(name: str, patient: Patient, scan: ScanGeometry, recon: int) -> dict[str, str]:
    """The 44 metadata columns of one volume; its spacing and position are the NIfTI's."""
    manufacturer, model, filter_type, series, kernels = _VENDORS[scan.vendor]
    xy, _, z = scan.spacing
    centre = tuple(p + (n - 1) / 2 * s for p, n, s in zip(scan.position, scan.shape, scan.spacing))
    return {
        "VolumeName": name,
        "Manufacturer": manufacturer,
        "SeriesDescription": series[recon - 1],
        "ManufacturerModelName": model,
        "PatientSex": patient.sex,
        "PatientAge": f"{patient.age:03d}Y",
        "ReconstructionDiameter": str(scan.fov_mm),
        "DistanceSourceToDetector": "1040",
        "DistanceSourceToPatient": "570",
        "GantryDetectorTilt": "0",
        "TableHeight": repr(scan.table_height),
        "RotationDirection": "CW",
        "ExposureTime": "500",
        "XRayTubeCurrent": str(scan.current_ma),
        "Exposure": str(scan.current_ma // 2),
        "FilterType": filter_type,
        "GeneratorPower": str(scan.current_ma * 120 // 1000),
        "FocalSpots": "",
        "ConvolutionKernel": kernels[recon - 1],
        "PatientPosition": "HFS",
        "RevolutionTime": "0.5",
        "SingleCollimationWidth": "0.625",
        "TotalCollimationWidth": "40",
        "TableSpeed": "",
        "TableFeedPerRotation": "",
        "SpiralPitchFactor": "0.993",
        "DataCollectionCenterPatient": _lps(centre),
        "ReconstructionTargetCenterPatient": _lps(centre),
        "ExposureModulationType": "",
        "CTDIvol": repr(round(scan.current_ma * 0.04, 2)),
        "ImagePositionPatient": _lps(scan.position),
        "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
        "SliceLocation": "",
        "SamplesPerPixel": "1",
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": str(scan.shape[1]),
        "Columns": str(scan.shape[0]),
        "XYSpacing": f"[{xy!r}, {xy!r}]",
        "RescaleIntercept": str(RESCALE_INTERCEPT),
        "RescaleSlope": str(RESCALE_SLOPE),
        "RescaleType": "HU",
        "NumberofSlices": str(scan.shape[2]),
        "ZSpacing": repr(z),
        "StudyDate": scan.study_date,
    }


def findings_sentences(patient: Patient) -> list[tuple[str | None, str]]:
    """``(anatomy or None, sentence)`` of the findings: abnormal ones, normal ones for the regions
    without a finding; None marks a sentence about the whole exam."""
    covered = {f.anatomy.split("/")[0] for f in patient.findings}
    sentences: list[tuple[str | None, str]] = [(None, _WHOLE)]
    for region, normal in _NORMAL:
        sentences += [(f.anatomy, f.sentence) for f in patient.findings if f.anatomy.split("/")[0] == region]
        if region not in covered:
            sentences.append((region, normal))
    return sentences + list(_CLOSING)


def report_row(name: str, patient: Patient, scan: ScanGeometry) -> dict[str, str]:
    """The report of a volume. Findings_EN is ``Not given.`` for patients with index 5 mod 8,
    Impressions_EN for 6 mod 8; either section alone names every present label."""
    findings = " ".join(sentence for _, sentence in findings_sentences(patient))
    impressions = " ".join(f.impression for f in patient.findings) or "No significant abnormality."
    return {
        "VolumeName": name,
        "ClinicalInformation_EN": patient.history,
        "Technique_EN": f"Non-contrast thorax CT in the supine position, {scan.slice_mm:g} mm sections.",
        "Findings_EN": NOT_GIVEN if patient.index % 8 == 5 else findings,
        "Impressions_EN": NOT_GIVEN if patient.index % 8 == 6 else impressions,
    }


def radgenome_rows(
    name: str, patient: Patient, findings_given: bool
) -> dict[str, list[dict[str, str | None]]]:
    """RadGenome's rows for one volume, per file (``None`` = NaN); no region report without findings."""
    present = {f.label: f for f in patient.findings}
    region_rows = [
        {"Volumename": name, "Anatomy": anatomy, "Sentence": sentence}
        for anatomy, sentence in findings_sentences(patient)
    ]
    abnormality = []
    for region in _REGIONS:
        inside = [
            f.sentence for f in patient.findings if f.anatomy == region or f.anatomy.startswith(region + "/")
        ]
        abnormality.append({"Volumename": name, "Anatomy": region, "Abnormality": " ".join(inside) or None})
    return {
        "region_report": region_rows if findings_given else [],
        "vqa_abnormality": abnormality,
        "vqa_location": [
            {"Volumename": name, "Anatomy": f.anatomy, "Abnormality": f.label.lower()}
            for f in patient.findings
        ],
        "vqa_presence": [
            {
                "Volumename": name,
                "Anatomy": present[label].anatomy if label in present else _REGION_OF[label],
                "Finding": label.lower(),
                "Presence": "Yes" if label in present else "No",
            }
            for label in CTRATE_LABELS
        ],
        "vqa_size": [
            {"Volumename": name, "Anatomy": f.anatomy, "Abnormality": f.label.lower(), "Size": f.size}
            for f in patient.findings
            if f.size
        ],
        "case_disorders": [
            {"Volumename": name, "Disorders": ", ".join(f.label.lower() for f in patient.findings) or None}
        ],
    }


# ----------------------------------------------------------------------------------------------
# Writing


@dataclass
class PatientRecord:
    """What a worker returns for one patient: CSV rows in volume order."""

    split: str
    name: str
    volumes: list[str]
    labels: tuple[int, ...]
    reports: list[dict[str, str]]
    metadata: list[dict[str, str]]
    radgenome: dict[str, list[dict[str, str | None]]]


@dataclass(frozen=True)
class GenerationSummary:
    """Result of :func:`generate`: what was written where."""

    out: Path
    versions: tuple[str, ...]
    patients: dict[str, list[str]]  # split -> patient folder names ("train_1", ...)
    volumes: dict[str, list[str]]  # split -> VolumeNames, CSV order
    labels: dict[str, tuple[int, ...]]  # VolumeName -> 18 labels in CTRATE_LABELS order
    seconds: float


def volume_path(out: str | os.PathLike, version: str, volume_name: str) -> Path:
    """Where ``version`` keeps ``volume_name`` (``<split>_<p>_<scan>_<recon>.nii.gz``) under ``out``."""
    split, pid, scan, _ = volume_name.removesuffix(".nii.gz").split("_")
    patient = f"{split}_{pid}"
    return Path(out) / DATASET_DIR / VOLUME_DIRS[version][split] / patient / f"{patient}_{scan}" / volume_name


def _write_patient(
    index: int, out: Path, seed: int, slices: int, size: int, versions: tuple[str, ...]
) -> PatientRecord:
    patient = sample_patient(seed, index, slices, size)
    volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (HU, affine)
    record = PatientRecord(
        patient.split, patient.name, [], patient.labels, [], [], {k: [] for k in RADGENOME_COLUMNS}
    )
    for number, (letter, recons) in enumerate(patient.scans):
        scan = sample_scan(seed, index, number, letter, slices, size)
        for recon in recons:
            name = f"{patient.name}_{letter}_{recon}.nii.gz"
            hu = render(patient, scan, recon, np.random.default_rng([seed, index, 2, number, recon]))
            volumes[name] = hu, scan.affine
            record.volumes.append(name)
            record.metadata.append(metadata_row(name, patient, scan, recon))
            report = report_row(name, patient, scan)
            record.reports.append(report)
            for key, rows in radgenome_rows(name, patient, report["Findings_EN"] != NOT_GIVEN).items():
                record.radgenome[key] += rows
    for version in versions:
        final = out / DATASET_DIR / VOLUME_DIRS[version][patient.split] / patient.name
        staging = final.with_name(f".tmp-{final.name}")  # the patient appears whole or not at all
        if staging.exists():
            shutil.rmtree(staging)
        for name, (hu, affine) in volumes.items():
            scan_folder = volume_path(out, version, name).parent.name
            _save_nifti(staging / scan_folder / name, stored(hu, version), affine)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    return record


def _csv_text(columns: tuple[str, ...], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _remove_stale(out: Path, keep: dict[str, set[str]], radgenome: bool) -> None:
    """Remove patient folders (and RadGenome CSVs) of an earlier run that this run does not write."""
    for version, dirs in VOLUME_DIRS.items():
        for split, folder_name in dirs.items():
            folder = out / DATASET_DIR / folder_name
            if not folder.is_dir():
                continue
            for child in folder.iterdir():
                name = child.name.removeprefix(".tmp-")
                if re.fullmatch(rf"{split}_\d+", name) and child.name not in keep.get(version, set()):
                    shutil.rmtree(child)
    if not radgenome:
        for split in CSV_SPLIT.values():
            for key in RADGENOME_COLUMNS:
                (out / RADGENOME_DIR / f"{split}_{key}.csv").unlink(missing_ok=True)


def generate(
    out: str | os.PathLike,
    patients: int = 16,
    seed: int = 0,
    slices: int = 24,
    size: int = 48,
    versions: tuple[str, ...] = ("v1", "v2"),
    radgenome: bool = True,
    workers: int | None = None,
) -> GenerationSummary:
    """Write a synthetic CT-RATE (``versions`` of the volumes, the three CSV families) and, with
    ``radgenome``, RadGenome-ChestCT's CSVs under ``out``; volumes are ``size x size x slices``.

    Same arguments -> same bytes, whatever ``workers`` is (``None``: all cores, ``0``/``1``: in
    process). Patient folders and RadGenome CSVs of an earlier run into ``out`` that this run does
    not write are removed.
    """
    if patients < 1 or slices < MIN_SLICES or size < MIN_SIZE:
        raise ValueError(
            f"need patients >= 1, slices >= {MIN_SLICES}, size >= {MIN_SIZE}; got {patients=}, {slices=}, {size=}"
        )
    versions = tuple(versions)
    if not versions or len(set(versions)) != len(versions) or not set(versions) <= set(VERSIONS):
        raise ValueError(f"versions must be distinct names from {VERSIONS}, got {versions!r}")
    start = time.perf_counter()
    out = Path(out)
    names = [f"{s}_{p}" for s, p in map(split_and_id, range(patients))]
    _remove_stale(out, {v: set(names) for v in versions}, radgenome)

    work = functools.partial(_write_patient, out=out, seed=seed, slices=slices, size=size, versions=versions)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or patients < 4:
        records = [work(i) for i in range(patients)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            records = list(pool.map(work, range(patients), chunksize=max(1, patients // (4 * workers))))

    dataset = out / DATASET_DIR
    for split in SPLITS:
        mine = [r for r in records if r.split == split]
        full = CSV_SPLIT[split]
        atomic_write_text(
            dataset / "radiology_text_reports" / f"{full}_reports.csv",
            _csv_text(REPORT_COLUMNS, [row for r in mine for row in r.reports]),
        )
        atomic_write_text(
            dataset / "metadata" / f"{full}_metadata.csv",
            _csv_text(METADATA_COLUMNS, [row for r in mine for row in r.metadata]),
        )
        label_rows = [dict(zip(LABEL_COLUMNS, (v, *r.labels))) for r in mine for v in r.volumes]
        atomic_write_text(
            dataset / "multi_abnormality_labels" / f"{split}_predicted_labels.csv",
            _csv_text(LABEL_COLUMNS, label_rows),
        )
        if radgenome:
            for key, columns in RADGENOME_COLUMNS.items():
                atomic_write_text(
                    out / RADGENOME_DIR / f"{full}_{key}.csv",
                    _csv_text(columns, [row for r in mine for row in r.radgenome[key]]),
                )
    return GenerationSummary(
        out=out,
        versions=versions,
        patients={s: [r.name for r in records if r.split == s] for s in SPLITS},
        volumes={s: [v for r in records if r.split == s for v in r.volumes] for s in SPLITS},
        labels={v: r.labels for r in records for v in r.volumes},
        seconds=time.perf_counter() - start,
    )
