"""Synthetic M3D-Cap / M3D-VQA data in the layout of the real release, learnable from the voxels.

The layout is the unpacked release's (:mod:`med3dvlm.data.releases.m3d.layout`): cases in two collections,
``M3D_Cap/ct_case/<id>/`` and ``M3D_Cap/ct_quizze/<id>/`` (every third case); every eighth case
holds a second series, the same phantom in another plane, and every sixteenth names it with a
diacritic (``..._réformat``, folded to ``..._reformat`` as the original's prepare folds it); the
split file ``M3D_Cap/M3D_Cap.json`` (``train``, ``validation``, ``test``, ``test100``) and the CSVs
name volumes ``M3D_Cap_npy/<collection>/<id>/<folded series>.npy``; ``M3D-VQA/`` holds
``M3D_VQA_{train,val,test,test5k}.csv`` and ``M3D_VQA_yn_train.csv`` (the release has yes/no
questions for training only).

Each series is a CT volume of an analytic abdomen phantom (body, spine, aorta, IVC, liver with
portal/hepatic vessels, spleen, kidneys with collecting systems, pancreas) holding one lesion.
Everything the report and the questions state is visible in the voxels:

* plane: the slice stacking axis (axial = z, coronal = y, sagittal = x); the phantom is evaluated
  directly on the ``slices x size x size`` grid of that plane, so no resampling is needed;
* phase: the enhancement of the vessels and kidneys (aorta in arterial, portal/hepatic veins and
  IVC in portal venous, collecting systems in delayed, nothing in non-contrast);
* organ, abnormality (kind, round/irregular, size in mm) and location (upper/lower, patient
  left/right half of the organ) of the lesion.

Coordinates are normalised to ``[-1, 1]`` on every axis, 1 unit = 200 mm. ``x < 0`` is the
patient's right (radiological display: the patient's right on the image left), ``y < 0`` anterior,
``z < 0`` superior. A case depends only on ``(seed, case index)``, so output bytes do not depend on
the number of workers.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from med3dvlm.data.prepared import SPLITS
from med3dvlm.data.releases.m3d.layout import (
    CAP_DIR,
    IMAGE_COLUMN,
    REPORT_FILE,
    SPLIT_FILE,
    TEST5K_CSV,
    VQA_COLUMNS,
    VQA_DIR,
    fold_series_name,
    vqa_csv_name,
)
from med3dvlm.utils.atomic import atomic_write_text

PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
PHASES: tuple[str, ...] = ("non-contrast", "arterial", "portal venous", "delayed")
ORGANS: tuple[str, ...] = ("liver", "spleen", "left kidney", "right kidney")
ABNORMALITIES: tuple[str, ...] = (
    "cyst",
    "round hypodense mass",
    "irregular hypodense mass",
    "round hyperdense mass",
    "irregular hyperdense mass",
    "calcified nodule",
)
LOCATIONS: tuple[str, ...] = ("upper right", "upper left", "lower right", "lower left")
QUESTION_TYPES: tuple[str, ...] = ("Plane", "Phase", "Organ", "Abnormality", "Location")
COLLECTIONS: tuple[str, ...] = ("ct_case", "ct_quizze")
# The release's prepared-folder prefix in the split file and the CSVs.
RELEASE_PREFIX = "M3D_Cap_npy"
DEFECTS: tuple[str, ...] = ("stray_slice", "truncated_jpeg", "empty_report")
CHOICE_ORDERS: tuple[str, ...] = ("shuffled", "fixed")

MM_PER_UNIT = 200.0
_SERIES_PLANE = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}
_SERIES_PHASE = {
    "non-contrast": "non_contrast",
    "arterial": "arterial_phase",
    "portal venous": "C__portal_venous_phase",
    "delayed": "delayed_phase",
}

# Gray values (0..1) per phase: non-contrast, arterial, portal venous, delayed.
_ENHANCEMENT: dict[str, tuple[float, float, float, float]] = {
    "aorta": (0.42, 0.96, 0.68, 0.50),
    "ivc": (0.42, 0.40, 0.74, 0.52),
    "portal": (0.40, 0.45, 0.86, 0.55),
    "liver": (0.50, 0.53, 0.62, 0.56),
    "spleen": (0.47, 0.60, 0.63, 0.55),
    "cortex": (0.50, 0.80, 0.70, 0.58),
    "medulla": (0.48, 0.52, 0.72, 0.60),
    "pelvis": (0.25, 0.25, 0.28, 0.97),
    "pancreas": (0.47, 0.60, 0.58, 0.52),
}
_FAT, _MUSCLE, _BONE = 0.25, 0.36, 0.90


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid in normalised (z, y, x) coordinates; ``irregular`` lobulates its edge."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    irregular: float = 0.0
    phase_seed: float = 0.0


@dataclass(frozen=True)
class CaseAttributes:
    """Everything the report and the questions of one case describe."""

    plane: str
    phase: str
    organ: str
    abnormality: str
    location: str
    size_mm: tuple[int, int]
    attenuation_hu: int


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of one generation run (picklable, shipped to the workers)."""

    seed: int = 0
    slices: int = 64
    size: int = 128
    jpeg_quality: int = 95
    defect_rate: float = 0.0
    lesion_scale: float = 1.0
    choice_order: str = "shuffled"


@dataclass
class CaseRecord:
    """What a worker returns for one case: the paths and texts the CSVs and split file need."""

    case_id: str
    collection: str
    series: list[str]  # folded names, as the split file and the CSVs write them
    report: str
    findings: str
    attributes: CaseAttributes
    closed_rows: list[dict[str, str]]
    yes_no_rows: list[dict[str, str]]
    defect: str | None


@dataclass
class GenerationSummary:
    """Result of :func:`generate`."""

    out: Path
    cases: int
    splits: dict[str, list[str]]
    defects: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# Phantom


# Nominal (centre, radii) of the organs that host lesions, before the per-case jitter.
HOST_ORGANS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "liver": ((-0.40, -0.05, -0.42), (0.36, 0.40, 0.36)),
    "spleen": ((-0.40, 0.20, 0.56), (0.28, 0.22, 0.15)),
    "right kidney": ((0.22, 0.36, -0.42), (0.26, 0.13, 0.14)),
    "left kidney": ((0.18, 0.36, 0.42), (0.26, 0.13, 0.14)),
}
# A lesion's centre sits this many host radii off the host's centre on x and z (its quadrant) ...
_QUADRANT_OFFSET = 0.4
# ... so diameters up to twice that share of the host's radius keep it on its side and inside the host.
_QUADRANT_FIT = 2 * _QUADRANT_OFFSET


def fit_to_quadrant(organ: str, long_mm: int, short_mm: int) -> tuple[int, int]:
    """Lesion diameters capped where the lesion would leave its quadrant of ``organ`` (the location
    answer) or the organ: the long axis runs along x, the short one along z and y (y never binds:
    the lesion sits within 0.15 host radii of the centre on y, and 0.4 x radii is under 0.85 y
    radii). The cap cuts no lesion drawn at ``lesion_scale=1``."""
    rz, _, rx = (r * MM_PER_UNIT for r in HOST_ORGANS[organ][1])
    long_mm = min(long_mm, int(_QUADRANT_FIT * rx))
    return long_mm, min(short_mm, long_mm, int(_QUADRANT_FIT * rz))


def sample_attributes(rng: np.random.Generator, lesion_scale: float = 1.0) -> CaseAttributes:
    """Draw the attributes of one case.

    ``lesion_scale`` multiplies the lesion's size (drawn and reported), up to what fits in its
    quadrant of the host organ.
    """
    organ = ORGANS[rng.integers(len(ORGANS))]
    abnormality = ABNORMALITIES[rng.integers(len(ABNORMALITIES))]
    max_mm = {"liver": 50, "spleen": 24, "left kidney": 22, "right kidney": 22}[organ]
    low = 8 if abnormality == "calcified nodule" else 12
    high = min(max_mm, 16) if abnormality == "calcified nodule" else max_mm
    long_axis = int(rng.integers(low, high + 1))
    short_axis = max(low - 2, round(long_axis * rng.uniform(0.7, 1.0)))
    long_axis, short_axis = round(long_axis * lesion_scale), round(short_axis * lesion_scale)
    long_axis, short_axis = fit_to_quadrant(organ, long_axis, short_axis)
    hu = {
        "cyst": int(rng.integers(0, 16)),
        "calcified nodule": int(rng.integers(250, 700)),
    }.get(abnormality, 0)
    if "hypodense" in abnormality:
        hu = int(rng.integers(15, 40))
    elif "hyperdense" in abnormality:
        hu = int(rng.integers(85, 140))
    return CaseAttributes(
        plane=PLANES[rng.integers(len(PLANES))],
        phase=PHASES[rng.integers(len(PHASES))],
        organ=organ,
        abnormality=abnormality,
        location=LOCATIONS[rng.integers(len(LOCATIONS))],
        size_mm=(long_axis, short_axis),
        attenuation_hu=hu,
    )


def _jitter(rng: np.random.Generator, values: tuple[float, ...], scale: float) -> tuple[float, ...]:
    return tuple(float(v + rng.uniform(-scale, scale)) for v in values)


def anatomy(rng: np.random.Generator) -> dict[str, Ellipsoid]:
    """Organ ellipsoids with per-case jitter of position and size."""

    def ell(center, radii, shift=0.03, grow=0.08) -> Ellipsoid:
        scale = 1.0 + rng.uniform(-grow, grow)
        return Ellipsoid(_jitter(rng, center, shift), tuple(r * scale for r in radii))

    long = 3.0  # vessels and spine run through the whole field of view
    return {
        "body": Ellipsoid((0.0, 0.0, 0.0), (long, 0.72 + rng.uniform(-0.04, 0.04), 0.92)),
        "muscle": Ellipsoid((0.0, 0.02, 0.0), (long, 0.62, 0.82)),
        "spine": Ellipsoid((0.0, 0.45, 0.0), (long, 0.11, 0.11)),
        "aorta": Ellipsoid((0.0, 0.24 + rng.uniform(-0.02, 0.02), 0.07), (long, 0.065, 0.065)),
        "ivc": Ellipsoid((0.0, 0.22 + rng.uniform(-0.02, 0.02), -0.12), (long, 0.065, 0.075)),
        "liver": ell(*HOST_ORGANS["liver"]),
        "spleen": ell(*HOST_ORGANS["spleen"]),
        "pancreas": ell((0.02, 0.05, 0.12), (0.07, 0.07, 0.28), grow=0.05),
        "right kidney": ell(*HOST_ORGANS["right kidney"]),
        "left kidney": ell(*HOST_ORGANS["left kidney"]),
    }


def _axis_range(coords: np.ndarray, center: float, radius: float) -> slice:
    lo = np.searchsorted(coords, center - radius, side="left")
    hi = np.searchsorted(coords, center + radius, side="right")
    return slice(int(lo), int(hi))


def paint(
    volume: np.ndarray, grid: tuple[np.ndarray, np.ndarray, np.ndarray], shape: Ellipsoid, value: float
) -> None:
    """Set the voxels of ``volume`` (z, y, x) inside ``shape`` to ``value``, touching only its bounding box."""
    reach = 1.0 + shape.irregular
    boxes = [_axis_range(c, m, r * reach) for c, m, r in zip(grid, shape.center, shape.radii)]
    if any(b.stop <= b.start for b in boxes):
        return
    dz = ((grid[0][boxes[0]] - shape.center[0]) / shape.radii[0])[:, None, None]
    dy = ((grid[1][boxes[1]] - shape.center[1]) / shape.radii[1])[None, :, None]
    dx = ((grid[2][boxes[2]] - shape.center[2]) / shape.radii[2])[None, None, :]
    q = dz * dz + dy * dy + dx * dx
    if shape.irregular:
        # Lobulated margin: the radius varies with direction, so the outline is visibly not round.
        azimuth = np.arctan2(dy, dx)
        elevation = np.arctan2(dz, np.sqrt(dx * dx + dy * dy))
        wobble = np.sin(3 * azimuth + shape.phase_seed) * np.cos(2 * elevation + shape.phase_seed)
        inside = q <= (1.0 + shape.irregular * wobble) ** 2
    else:
        inside = q <= 1.0
    volume[boxes[0], boxes[1], boxes[2]][inside] = value


def _lesion(rng: np.random.Generator, organ: Ellipsoid, attrs: CaseAttributes) -> Ellipsoid:
    vertical, side = attrs.location.split()
    # Patient right is x < 0; superior is z < 0.
    dz = (-1 if vertical == "upper" else 1) * _QUADRANT_OFFSET * organ.radii[0]
    dx = (-1 if side == "right" else 1) * _QUADRANT_OFFSET * organ.radii[2]
    long_r = attrs.size_mm[0] / 2 / MM_PER_UNIT
    short_r = attrs.size_mm[1] / 2 / MM_PER_UNIT
    irregular = 0.3 if attrs.abnormality.startswith("irregular") else 0.0
    center = (
        organ.center[0] + dz,
        organ.center[1] + rng.uniform(-0.15, 0.15) * organ.radii[1],
        organ.center[2] + dx,
    )
    return Ellipsoid(center, (short_r, short_r, long_r), irregular, float(rng.uniform(0, 2 * np.pi)))


def _lesion_value(attrs: CaseAttributes, organ_value: float) -> float:
    if attrs.abnormality == "cyst":
        return 0.12
    if attrs.abnormality == "calcified nodule":
        return 0.97
    if "hypodense" in attrs.abnormality:
        return organ_value - 0.2
    return organ_value + (0.28 if attrs.phase == "arterial" else 0.2)


def plane_grid(plane: str, slices: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised (z, y, x) sample coordinates: ``slices`` points on the stacking axis, ``size`` in-plane."""
    n = {"axial": (slices, size, size), "coronal": (size, slices, size), "sagittal": (size, size, slices)}[
        plane
    ]
    return tuple(np.linspace(-1.0, 1.0, k, dtype=np.float32) for k in n)


def to_series(canonical: np.ndarray, plane: str) -> np.ndarray:
    """(z, y, x) phantom -> (slice, row, column) series: rows run superior->inferior in coronal/sagittal."""
    order = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}[plane]
    return np.ascontiguousarray(canonical.transpose(order))


@functools.lru_cache(maxsize=2)
def _noise_bank(voxels: int) -> np.ndarray:
    # Drawing fresh Gaussian noise per case costs more than the rest of the phantom; a fixed bank
    # read at a per-case random offset is as good for the images and keeps output seed-determined.
    return np.random.default_rng(20240531).standard_normal(3 * voxels, dtype=np.float32)


def render_case(rng: np.random.Generator, attrs: CaseAttributes, slices: int, size: int) -> np.ndarray:
    """The uint8 series ``(slices, size, size)`` of one case."""
    phase = PHASES.index(attrs.phase)
    shapes = anatomy(rng)
    grid = plane_grid(attrs.plane, slices, size)
    volume = np.zeros(tuple(len(g) for g in grid), dtype=np.float32)
    enh = {name: values[phase] for name, values in _ENHANCEMENT.items()}

    paint(volume, grid, shapes["body"], _FAT)
    paint(volume, grid, shapes["muscle"], _MUSCLE)
    paint(volume, grid, shapes["spine"], _BONE)
    paint(volume, grid, shapes["aorta"], enh["aorta"])
    paint(volume, grid, shapes["ivc"], enh["ivc"])
    paint(volume, grid, shapes["pancreas"], enh["pancreas"])
    paint(volume, grid, shapes["spleen"], enh["spleen"])
    liver = shapes["liver"]
    paint(volume, grid, liver, enh["liver"])
    portal = Ellipsoid(
        (liver.center[0] + 0.15, liver.center[1] + 0.05, liver.center[2] + 0.12), (0.05, 0.04, 0.16)
    )
    paint(volume, grid, portal, enh["portal"])
    for offset in (-0.16, 0.0, 0.16):  # hepatic veins running craniocaudally
        vein = Ellipsoid(
            (liver.center[0] - 0.05, liver.center[1] + offset * 0.5, liver.center[2] + offset),
            (0.26, 0.022, 0.022),
        )
        paint(volume, grid, vein, enh["portal"])
    for side in ("right kidney", "left kidney"):
        kidney = shapes[side]
        paint(volume, grid, kidney, enh["cortex"])
        medulla = Ellipsoid(kidney.center, tuple(r * 0.7 for r in kidney.radii))
        paint(volume, grid, medulla, enh["medulla"])
        medial = 1.0 if kidney.center[2] < 0 else -1.0
        pelvis = Ellipsoid(
            (kidney.center[0], kidney.center[1], kidney.center[2] + medial * 0.04),
            (kidney.radii[0] * 0.45, kidney.radii[1] * 0.35, kidney.radii[2] * 0.4),
        )
        paint(volume, grid, pelvis, enh["pelvis"])

    host = shapes[attrs.organ]
    host_value = enh["cortex"] if "kidney" in attrs.organ else enh[attrs.organ]
    paint(volume, grid, _lesion(rng, host, attrs), _lesion_value(attrs, host_value))

    bank = _noise_bank(volume.size)
    start = int(rng.integers(0, bank.size - volume.size))
    sigma = np.float32(rng.uniform(0.012, 0.025))
    gain, bias = np.float32(255.0 * rng.uniform(0.95, 1.05)), np.float32(255.0 * rng.uniform(-0.03, 0.03))
    volume += bank[start : start + volume.size].reshape(volume.shape) * sigma
    volume *= gain
    volume += bias + np.float32(0.5)
    np.clip(volume, 0, 255, out=volume)
    return to_series(volume.astype(np.uint8), attrs.plane)


def series_name(plane: str, phase: str) -> str:
    """Series folder name in the M3D style, e.g. ``Axial_C__portal_venous_phase``."""
    return f"{_SERIES_PLANE[plane]}_{_SERIES_PHASE[phase]}"


# ----------------------------------------------------------------------------------------------
# Reports


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _location_phrase(rng: np.random.Generator, attrs: CaseAttributes) -> str:
    vertical, side = attrs.location.split()
    organ = attrs.organ
    if "kidney" in organ:
        pole = f"{vertical} pole"
        return _pick(
            rng,
            [
                f"{pole} of the {organ}, {side} side",
                f"{side} aspect of the {pole} of the {organ}",
                f"{vertical} {side} part of the {organ}",
            ],
        )
    upper = {"upper": ["upper", "superior", "cranial"], "lower": ["lower", "inferior", "caudal"]}[vertical]
    return _pick(
        rng,
        [
            f"{_pick(rng, upper)} {side} portion of the {organ}",
            f"{side} {_pick(rng, upper)} aspect of the {organ}",
            f"{vertical} {side} part of the {organ}",
        ],
    )


def _lesion_words(rng: np.random.Generator, attrs: CaseAttributes) -> tuple[str, str]:
    """(noun phrase, characterisation sentence) of the lesion."""
    kind = attrs.abnormality
    if kind == "cyst":
        noun = _pick(
            rng,
            [
                "simple cyst",
                "well-circumscribed cystic lesion",
                "round fluid-attenuation cyst",
                "thin-walled cyst",
            ],
        )
        detail = _pick(
            rng,
            [
                f"It has water attenuation (about {attrs.attenuation_hu} HU) and no enhancing wall.",
                f"Fluid density of approximately {attrs.attenuation_hu} HU, no solid component.",
                "No internal septation or enhancement is seen.",
            ],
        )
        return noun, detail
    if kind == "calcified nodule":
        noun = _pick(
            rng,
            ["calcified nodule", "dense calcification", "calcified granuloma", "punctate calcified focus"],
        )
        detail = _pick(
            rng,
            [
                f"Its density reaches about {attrs.attenuation_hu} HU.",
                "It is homogeneously calcified.",
                "Likely a benign calcification.",
            ],
        )
        return noun, detail
    shape, density, _ = kind.split()
    margin = {
        "round": ["well-defined", "smooth", "sharply marginated"],
        "irregular": ["ill-defined", "lobulated", "irregular"],
    }[shape]
    contrast = {
        "hypodense": ["hypodense", "low-attenuation", "hypoattenuating"],
        "hyperdense": ["hyperdense", "hyperattenuating", "avidly enhancing"],
    }[density]
    noun = f"{_pick(rng, margin)} {_pick(rng, contrast)} {_pick(rng, ['mass', 'lesion', 'nodule', 'focal lesion'])}"
    detail = _pick(
        rng,
        [
            f"Mean attenuation is about {attrs.attenuation_hu} HU.",
            f"The margins are {_pick(rng, margin)}.",
            f"It measures roughly {attrs.attenuation_hu} HU and appears {_pick(rng, margin)}.",
        ],
    )
    return noun, detail


_NORMAL_FINDINGS: dict[str, list[str]] = {
    "liver": [
        "The liver is normal in size and attenuation.",
        "No other focal hepatic lesion.",
        "The remaining liver parenchyma is homogeneous.",
    ],
    "spleen": ["The spleen is unremarkable.", "Spleen is normal in size.", "No splenic lesion is seen."],
    "left kidney": ["The left kidney is unremarkable.", "No left hydronephrosis."],
    "right kidney": ["The right kidney is unremarkable.", "No right hydronephrosis."],
    "other": [
        "The pancreas is normal.",
        "No free intraperitoneal fluid.",
        "No enlarged lymph nodes.",
        "The adrenal glands are normal.",
        "The abdominal aorta is of normal calibre.",
        "Visualised bowel loops are unremarkable.",
        "No ascites.",
        "Mild degenerative change of the lumbar spine.",
        "The gallbladder is unremarkable.",
    ],
}


def _technique(rng: np.random.Generator, attrs: CaseAttributes) -> str:
    plane, phase = attrs.plane, attrs.phase
    if phase == "non-contrast":
        return _pick(
            rng,
            [
                f"Non-contrast CT of the abdomen, {plane} images.",
                f"Unenhanced {plane} CT images of the abdomen.",
                f"{plane.capitalize()} non-contrast abdominal CT.",
            ],
        )
    return _pick(
        rng,
        [
            f"Contrast-enhanced CT in the {phase} phase, {plane} reconstruction.",
            f"{plane.capitalize()} CT images acquired in the {phase} phase.",
            f"Abdominal CT, {phase} phase, {plane} plane.",
        ],
    )


def _phase_observation(rng: np.random.Generator, phase: str) -> str:
    return {
        "non-contrast": _pick(rng, ["No intravenous contrast was given.", "Vessels are unopacified."]),
        "arterial": _pick(
            rng, ["The aorta is densely opacified.", "Bright arterial opacification of the aorta."]
        ),
        "portal venous": _pick(
            rng, ["The portal and hepatic veins are well opacified.", "Good portal venous enhancement."]
        ),
        "delayed": _pick(
            rng,
            [
                "Contrast is excreted into both renal collecting systems.",
                "Excreted contrast opacifies the renal pelves.",
            ],
        ),
    }[phase]


def write_report(rng: np.random.Generator, attrs: CaseAttributes) -> tuple[str, str]:
    """(full text.txt content, findings text) for a case."""
    noun, detail = _lesion_words(rng, attrs)
    a, b = attrs.size_mm
    size = _pick(rng, [f"{a} x {b} mm", f"{a} mm", f"{a} by {b} mm", f"{a / 10:.1f} cm"])
    where = _location_phrase(rng, attrs)
    article = "An" if noun[0] in "aeiou" else "A"
    lesion = _pick(
        rng,
        [
            f"{article} {noun} measuring {size} is seen in the {where}.",
            f"There is {article.lower()} {noun} in the {where}, measuring {size}.",
            f"In the {where} there is {article.lower()} {noun} of {size}.",
            f"{attrs.organ.capitalize()}: {noun} ({size}) in the {where}.",
        ],
    )
    # The characterisation refers back to the lesion ("It ..."), so it always follows it.
    block = [lesion, detail] if rng.random() < 0.8 else [lesion]
    others = [s for organ, pool in _NORMAL_FINDINGS.items() if organ != attrs.organ for s in pool]
    count = int(rng.integers(2, 5))
    context = [others[i] for i in rng.choice(len(others), size=count, replace=False)]
    if rng.random() < 0.7:
        context.append(_phase_observation(rng, attrs.phase))
    rng.shuffle(context)
    at = int(rng.integers(0, 2))
    ordered = context[:at] + block + context[at:]
    if rng.random() < 0.8:
        ordered.insert(0, _technique(rng, attrs))
    findings = " ".join(ordered)
    report = f"study_findings: {findings}\n"
    if rng.random() < 0.4:
        impression = _pick(
            rng,
            [
                f"{noun.capitalize()} of the {attrs.organ} ({a} mm).",
                f"Findings consistent with a {attrs.abnormality} in the {attrs.organ}.",
                f"{attrs.abnormality.capitalize()}, {attrs.organ}, {a} mm.",
            ],
        )
        advice = _pick(
            rng,
            [
                "Follow-up imaging is suggested.",
                "Correlate clinically.",
                "Consider MRI for further characterisation.",
                "",
            ],
        )
        report += f"discussion: {impression} {advice}".rstrip() + "\n"
    return report, findings


# ----------------------------------------------------------------------------------------------
# Questions


def _answers(attrs: CaseAttributes) -> list[str]:
    """Answer text per question type 1..5."""
    vertical, side = attrs.location.split()
    return [
        attrs.plane,
        f"{attrs.phase} phase",
        attrs.organ,
        attrs.abnormality,
        f"{vertical} {side} part of the {attrs.organ}",
    ]


def _choice_pool(qtype: int, attrs: CaseAttributes) -> list[str]:
    """Every option of question type ``qtype`` (right answer included), in a fixed order."""
    return [
        [*PLANES, "oblique"],
        [f"{p} phase" for p in PHASES],
        [*ORGANS, "pancreas"],
        list(ABNORMALITIES),
        [f"{loc} part of the {attrs.organ}" for loc in LOCATIONS],
    ][qtype - 1]


def _wrong_choices(rng: np.random.Generator, qtype: int, attrs: CaseAttributes) -> list[str]:
    answer = _answers(attrs)[qtype - 1]
    pool = [option for option in _choice_pool(qtype, attrs) if option != answer]
    return [pool[i] for i in rng.choice(len(pool), size=3, replace=False)]


_QUESTIONS: list[list[str]] = [
    [
        "In which plane is this CT image displayed?",
        "What is the imaging plane of this scan?",
        "Which plane is this series reconstructed in?",
    ],
    [
        "In which contrast phase was this CT scan acquired?",
        "What is the phase of this CT scan?",
        "Which enhancement phase does this image show?",
    ],
    [
        "Which organ contains the lesion?",
        "In which organ is the abnormality located?",
        "Where is the abnormal finding, by organ?",
    ],
    [
        "What type of abnormality is seen in the {organ}?",
        "How would you describe the lesion in the {organ}?",
        "What abnormality is present in this scan?",
    ],
    [
        "Where in the {organ} is the lesion located?",
        "Which part of the {organ} holds the abnormality?",
        "What is the location of the lesion within the {organ}?",
    ],
]


def closed_questions(
    rng: np.random.Generator,
    attrs: CaseAttributes,
    image_path: str,
    text: str,
    choice_order: str = "shuffled",
) -> list[dict[str, str]]:
    """One multiple-choice row per question type.

    ``choice_order="shuffled"`` (M3D-VQA's way) puts the right answer at a random letter, so a model
    must read the choices; ``"fixed"`` lists the four options in their :func:`_choice_pool` order, so
    the letter follows from the image alone (the offline demo's tiny LLM cannot learn to read in minutes).
    """
    if choice_order not in CHOICE_ORDERS:
        raise ValueError(f"choice_order must be one of {CHOICE_ORDERS}, got {choice_order!r}")
    rows = []
    for qtype, answer in enumerate(_answers(attrs), start=1):
        choices = _wrong_choices(rng, qtype, attrs)
        letter = int(rng.integers(4))  # drawn in both orders, so the rest of the case stays the same
        choices.insert(letter, answer)
        if choice_order == "fixed":
            choices.sort(key=_choice_pool(qtype, attrs).index)
            letter = choices.index(answer)
        rows.append(
            {
                IMAGE_COLUMN: image_path,
                "Text": text,
                "Question Type": str(qtype),
                "Question": _pick(rng, _QUESTIONS[qtype - 1]).format(organ=attrs.organ),
                "Choice A": choices[0],
                "Choice B": choices[1],
                "Choice C": choices[2],
                "Choice D": choices[3],
                "Answer": answer,
                "Answer Choice": "ABCD"[letter],
            }
        )
    return rows


def yes_no_questions(
    rng: np.random.Generator, attrs: CaseAttributes, image_path: str, text: str
) -> list[dict[str, str]]:
    """One yes/no row per question type, asking about the true value or a wrong one (50/50)."""
    rows = []
    for qtype, answer in enumerate(_answers(attrs), start=1):
        yes = bool(rng.random() < 0.5)
        asked = answer if yes else _wrong_choices(rng, qtype, attrs)[0]
        question = [
            f"Is this image shown in the {asked} plane?",
            f"Was this scan acquired in the {asked}?",
            f"Is there a lesion in the {asked}?",
            f"Is the abnormality {'an' if asked[0] in 'aeiou' else 'a'} {asked}?",
            f"Is the lesion in the {asked}?",
        ][qtype - 1]
        rows.append(
            {
                IMAGE_COLUMN: image_path,
                "Text": text,
                "Question Type": str(qtype),
                "Question": question,
                "Choice A": "",
                "Choice B": "",
                "Choice C": "",
                "Choice D": "",
                "Answer": "Yes" if yes else "No",
                "Answer Choice": "",
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# Defects (for testing prepare)


def corrupt_case(case_dir: str | os.PathLike, defect: str) -> None:
    """Damage a written raw case the way real downloads are damaged.

    ``stray_slice``: an extra slice of another shape at the end of the series; ``truncated_jpeg``:
    the middle slice cut to half its bytes; ``empty_report``: ``text.txt`` emptied.
    """
    case_dir = Path(case_dir)
    if defect == "empty_report":
        (case_dir / REPORT_FILE).write_text("", encoding="utf-8")
        return
    series_dir = next(p for p in sorted(case_dir.iterdir()) if p.is_dir())
    slices = sorted(series_dir.glob("*.jpeg"), key=lambda p: int(p.stem))
    if defect == "stray_slice":
        first = Image.open(slices[0])
        width, height = first.size
        stray = Image.new("L", (width, max(1, height // 2)), color=128)
        stray.save(series_dir / f"{len(slices)}.jpeg", format="JPEG")
    elif defect == "truncated_jpeg":
        target = slices[len(slices) // 2]
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    else:
        raise ValueError(f"unknown defect {defect!r}; choose one of {DEFECTS}")


# ----------------------------------------------------------------------------------------------
# Writing


def case_id(index: int) -> str:
    """Zero-padded case folder name."""
    return f"{index:06d}"


def collection_of(index: int) -> str:
    return COLLECTIONS[1] if index % 3 == 2 else COLLECTIONS[0]


def _extra_series(index: int, attrs: CaseAttributes) -> tuple[CaseAttributes, str] | None:
    """Every eighth case's second series: the next plane, named with a diacritic every sixteenth."""
    if index % 8:
        return None
    other = replace(attrs, plane=PLANES[(PLANES.index(attrs.plane) + 1) % len(PLANES)])
    name = series_name(other.plane, other.phase) + ("_réformat" if index % 16 == 0 else "")
    return other, name


def release_path(collection: str, case: str, name: str) -> str:
    """How the release's split file and CSVs name a file of a case."""
    return f"{RELEASE_PREFIX}/{collection}/{case}/{name}"


def _write_case(index: int, out: Path, config: SyntheticConfig) -> CaseRecord:
    rng = np.random.default_rng([config.seed, index])
    attrs = sample_attributes(rng, config.lesion_scale)
    collection = collection_of(index)
    series = {series_name(attrs.plane, attrs.phase): attrs}
    extra = _extra_series(index, attrs)
    anatomy_state = rng.bit_generator.state  # the second series renders the same phantom and lesion
    volumes = {name: render_case(rng, attrs, config.slices, config.size) for name in series}
    if extra is not None:
        copy = np.random.default_rng()
        copy.bit_generator.state = anatomy_state
        series[extra[1]] = extra[0]
        volumes[extra[1]] = render_case(copy, extra[0], config.slices, config.size)
    report, findings = write_report(rng, attrs)
    closed, yes_no = [], []
    for number, (name, series_attrs) in enumerate(series.items()):
        # The first series draws from the case's stream as before; a second from its own.
        draws = rng if number == 0 else np.random.default_rng([config.seed, index, 2])
        image_path = release_path(collection, case_id(index), f"{fold_series_name(name)}.npy")
        closed += closed_questions(draws, series_attrs, image_path, findings, config.choice_order)
        yes_no += yes_no_questions(draws, series_attrs, image_path, findings)
    # A separate stream, so the defect rate never changes the content of the cases.
    defect_rng = np.random.default_rng([config.seed, index, 1])
    defect = DEFECTS[defect_rng.integers(len(DEFECTS))] if defect_rng.random() < config.defect_rate else None

    final = out / CAP_DIR / collection / case_id(index)
    staging = final.with_name(f".tmp-{final.name}")  # the case appears whole or not at all
    if staging.exists():
        shutil.rmtree(staging)
    for name, volume in volumes.items():
        (staging / name).mkdir(parents=True)
        for k, plane in enumerate(volume):
            Image.fromarray(plane, mode="L").save(
                staging / name / f"{k}.jpeg", format="JPEG", quality=config.jpeg_quality
            )
    (staging / REPORT_FILE).write_text(report, encoding="utf-8")
    if defect:
        corrupt_case(staging, defect)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return CaseRecord(
        case_id(index),
        collection,
        [fold_series_name(name) for name in series],
        report,
        findings,
        attrs,
        closed,
        yes_no,
        defect,
    )


def split_cases(ids: list[str], fractions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Shuffle case ids with ``seed`` and cut them into train/validation/test (each non-empty when possible)."""
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; expected {list(SPLITS)}")
    order = [ids[i] for i in np.random.default_rng([seed, 2**31 - 1]).permutation(len(ids))]
    n = len(order)
    counts = {}
    for name in ("validation", "test"):
        frac = float(fractions.get(name, 0.0))
        counts[name] = max(1, round(n * frac)) if frac > 0 and n >= 3 else round(n * frac)
    counts["train"] = n - counts["validation"] - counts["test"]
    if counts["train"] < 0:
        raise ValueError(f"split fractions {dict(fractions)} leave no room for {n} cases")
    splits, start = {}, 0
    for name in SPLITS:
        splits[name] = sorted(order[start : start + counts[name]])
        start += counts[name]
    return splits


def _csv_text(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(VQA_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _remove_stale_cases(cap_dir: Path, keep: set[tuple[str, str]]) -> None:
    for collection in COLLECTIONS:
        folder = cap_dir / collection
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            case = child.name.removeprefix(".tmp-")
            if child.is_dir() and re.fullmatch(r"\d{6}", case) and (collection, child.name) not in keep:
                shutil.rmtree(child)


def generate(
    out: str | os.PathLike,
    cases: int,
    seed: int = 0,
    slices: int = 64,
    size: int = 128,
    splits: dict[str, float] | None = None,
    workers: int | None = None,
    jpeg_quality: int = 95,
    defect_rate: float = 0.0,
    lesion_scale: float = 1.0,
    choice_order: str = "shuffled",
) -> GenerationSummary:
    """Write ``cases`` synthetic cases in the raw M3D-Cap / M3D-VQA layout under ``out``.

    Same arguments -> same bytes, whatever ``workers`` is (``None``: all cores, ``0``/``1``: in
    process). Case folders of an earlier run into ``out`` that this run does not produce are removed.
    """
    if cases < 1 or slices < 1 or size < 8:
        raise ValueError(f"need cases >= 1, slices >= 1, size >= 8; got {cases=}, {slices=}, {size=}")
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
    if lesion_scale <= 0:
        raise ValueError(f"lesion_scale must be > 0, got {lesion_scale}")
    if choice_order not in CHOICE_ORDERS:
        raise ValueError(f"choice_order must be one of {CHOICE_ORDERS}, got {choice_order!r}")
    start = time.perf_counter()
    out = Path(out)
    config = SyntheticConfig(
        seed=seed,
        slices=slices,
        size=size,
        jpeg_quality=jpeg_quality,
        defect_rate=defect_rate,
        lesion_scale=lesion_scale,
        choice_order=choice_order,
    )
    cap_dir = out / CAP_DIR
    cap_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_cases(cap_dir, {(collection_of(i), case_id(i)) for i in range(cases)})

    work = functools.partial(_write_case, out=out, config=config)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or cases < 4:
        records = [work(i) for i in range(cases)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            records = list(pool.map(work, range(cases), chunksize=max(1, min(32, cases // (4 * workers)))))

    by_id = {r.case_id: r for r in records}
    split_ids = split_cases(list(by_id), splits or {"train": 0.8, "validation": 0.1, "test": 0.1}, seed)
    cap = {
        split: [
            {
                "image": release_path(by_id[i].collection, i, f"{series}.npy"),
                "text": release_path(by_id[i].collection, i, REPORT_FILE),
            }
            for i in ids
            for series in by_id[i].series
        ]
        for split, ids in split_ids.items()
    }
    cap["test100"] = cap["test"][:100]  # the release's subsets of the test list (test100, test500, test1k)
    atomic_write_text(cap_dir / SPLIT_FILE, json.dumps(cap, indent=1) + "\n")
    for name, ids in split_ids.items():
        atomic_write_text(
            out / VQA_DIR / vqa_csv_name(name), _csv_text([r for i in ids for r in by_id[i].closed_rows])
        )
    test_rows = [r for i in split_ids["test"] for r in by_id[i].closed_rows]
    atomic_write_text(out / VQA_DIR / TEST5K_CSV, _csv_text(test_rows[:5000]))
    atomic_write_text(
        out / VQA_DIR / vqa_csv_name("train", yes_no=True),
        _csv_text([r for i in split_ids["train"] for r in by_id[i].yes_no_rows]),
    )
    defects = {r.case_id: r.defect for r in records if r.defect}
    return GenerationSummary(out, cases, split_ids, defects, time.perf_counter() - start)
