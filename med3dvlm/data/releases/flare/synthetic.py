"""Synthetic FLARE 2025 Task 5 (FLARE-Task5-MLLM-3D) in the release's file and JSON layout, learnable from the voxels.

Layout (the raw download's, ``datasets.md`` §1.1): ``train/CT-AMOS-1290/amos_NNNN.nii.gz`` with
``train/CT-AMOS-Tr.json``, ``train/CT-RATE-2000/train_<pid>_<scan>_<recon>.nii.gz`` with
``train/CT-RATE-Tr.json`` (and an identical ``train/CT-RATE-Tr .json`` with ``alt_spelling``),
``validation/images/`` holding both sources with ``validation/val.json``, and ``README.md``.
Even case indices are AMOS (abdomen), odd ones CT-RATE (chest); indices with ``index % 10`` in
{3, 6, 9} go to validation (30 %), the rest to the training folder of their source.

Volumes are int16 NIfTI in Hounsfield units, stored as ``(x, y, z)`` with an LPS affine (i to the
patient's left, j to posterior, k to superior), the voxel spacing following a 400 mm field of view
(0.78 mm in-plane at 512). The abdomen is :mod:`med3dvlm.data.releases.m3d.synthetic`'s phantom in HU
(fat -100, muscle 50, liver 60, spleen 48, kidneys 35, spine 600); the chest has a body, lungs at
-850 HU, heart, descending aorta, spine and trachea. The abnormalities, each present with
probability 0.45, and how they are drawn:

* Liver lesion: a well-defined hypodense (0-15 HU) sphere, 25-45 mm, in the right or left lobe
  (patient right / left of the liver's centre);
* Kidney stone: a 3-8 mm calculus (600-1200 HU) in the right or left renal sinus;
* Splenomegaly: the spleen's craniocaudal length x1.55-1.7 (over 15 cm; normal 10-12 cm);
* Ascites: fluid (8 HU) in a rim around liver and spleen and a pool in the pelvis;
* Pleural effusion: fluid (15 HU) filling the posterior part of the right, left or both lungs;
* Lung nodule: a 6-20 mm soft-tissue (30 HU) nodule in the upper zone of the right or left lung;
* Cardiomegaly: the heart x1.25 (mild) or x1.5 (marked);
* Emphysema: lung at -950 HU instead of -850, in the upper zone or the whole lung (diffuse).

Lesions are drawn at least a voxel across, so they show at any resolution (reported sizes are the
true ones). The findings, the global question (which abnormalities are present) and the local
chains ("Is there X?" -> "Yes"/"No", then the location, grade or pattern) state exactly these.

Edge cases (``datasets.md`` §6), at fixed case indices (:data:`EDGE_CASES`):

* 0 (``amos_0001``, AMOS train): 4-D volume ``(x, y, z, 2)``, frame 1 = frame 0 + 300 HU;
* 1 (``train_2_a_1``, CT-RATE train): empty ``local_vqa``;
* 2 (``amos_0003``, AMOS train): nothing abnormal, so ``global_vqa[0].answer`` is empty and every
  follow-up is answered "None of the above";
* 3 (``valid_4_a_2``) and 6 (``amos_0007``): validation holds both sources;
* 4 (``amos_0005``, AMOS train): a liver lesion, so a finding text with a hyphen ("well-defined"),
  and its chain listed out of order: root id 5, then child 7, then child 6;
* 5 (``train_6_b_1``, CT-RATE train): the ``lungs and pleura`` finding spans two lines;
* 7 (``train_8_b_2``, CT-RATE train): empty ``findings``.

In training files every follow-up's choices end with "None of the above", the answer of every
follow-up under a "No" root; ``val.json`` never offers it and lists no follow-ups under a "No" root.
A case depends only on ``(seed, index)``: same arguments, same bytes, whatever ``workers`` is.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from med3dvlm.data.releases.ctrate.layout import CTRATE_LABELS
from med3dvlm.data.releases.flare.recipe import ABDOMEN, CHEST
from med3dvlm.data.releases.m3d.synthetic import (
    MM_PER_UNIT,
    Ellipsoid,
    anatomy,
    paint,
    plane_grid,
)
from med3dvlm.utils.atomic import atomic_path, atomic_write_text

# The 19 region keys of ``findings`` (datasets.md §1.2), lower-case as the scorer reads them.
REGIONS: tuple[str, ...] = (
    "liver",
    "biliary system",
    "spleen",
    "pancreas",
    "kidneys",
    "endocrine system",
    "lymphatic system",
    "gastrointestinal tract",
    "abdominal cavity and peritoneum",
    "blood vessels",
    "musculoskeletal system",
    "lungs and pleura",
    "respiratory tract",
    "heart",
    "mediastinum",
    "esophagus",
    "urinary system",
    "breast tissue",
    "diaphragm",
)
TRAIN_DIRS: dict[str, str] = {ABDOMEN: "train/CT-AMOS-1290", CHEST: "train/CT-RATE-2000"}
TRAIN_JSONS: dict[str, str] = {ABDOMEN: "train/CT-AMOS-Tr.json", CHEST: "train/CT-RATE-Tr.json"}
ALT_CHEST_JSON = "train/CT-RATE-Tr .json"
VALIDATION_DIR = "validation/images"
VALIDATION_JSON = "validation/val.json"
NONE_OF_THE_ABOVE = "None of the above"
GLOBAL_QUESTION = "Which of the following abnormalities are present in this scan?"
EDGE_CASES: dict[str, int] = {
    "four_d": 0,
    "empty_local_vqa": 1,
    "empty_global_answer": 2,
    "none_of_the_above": 2,
    "validation_chest": 3,
    "children_out_of_order": 4,
    "hyphen_in_finding": 4,
    "newline_in_finding": 5,
    "validation_abdomen": 6,
    "empty_findings": 7,
}
MIN_CASES = max(EDGE_CASES.values()) + 1
FOUR_D_OFFSET_HU = 300
PRESENCE = 0.45

AIR, FAT, VISCERAL_FAT, MUSCLE, BONE, FLUID = -1000, -100, -90, 50, 600, 8
LUNG, EMPHYSEMA, EFFUSION = -850, -950, 15
ABDOMEN_HU: dict[str, int] = {
    "liver": 60,
    "spleen": 48,
    "pancreas": 40,
    "kidney": 35,
    "renal sinus": -60,
    "aorta": 45,
    "ivc": 40,
}
CHEST_HU: dict[str, int] = {"heart": 40, "aorta": 40, "spine": BONE, "trachea": AIR, "nodule": 30}
# Nominal (centre, radii) of the chest phantom in normalised (z, y, x) (x < 0: patient right,
# y < 0: anterior, z < 0: superior; 1 unit = 200 mm), before the per-case jitter.
CHEST_ORGANS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "body": ((0.0, 0.0, 0.0), (3.0, 0.62, 0.9)),
    "wall": ((0.0, 0.0, 0.0), (3.0, 0.56, 0.84)),
    "cavity": ((0.0, 0.0, 0.0), (3.0, 0.48, 0.76)),
    "right lung": ((0.0, 0.02, -0.38), (0.7, 0.38, 0.28)),
    "left lung": ((0.0, 0.02, 0.38), (0.7, 0.38, 0.28)),
    "heart": ((0.3, -0.15, 0.08), (0.24, 0.2, 0.24)),
    "aorta": ((0.0, 0.28, 0.12), (3.0, 0.06, 0.06)),
    "spine": ((0.0, 0.45, 0.0), (3.0, 0.1, 0.1)),
    "trachea": ((-0.55, -0.02, 0.0), (0.45, 0.05, 0.05)),
}
# Effusion fills the lung behind this share of its y radius off its centre (the dependent part).
EFFUSION_FROM = 0.45
CARDIOMEGALY: dict[str, float] = {"Mild": 1.25, "Marked": 1.5}
# The abdominal cavity inside M3D's muscle wall, and where ascites pools in the pelvis.
_CAVITY = Ellipsoid((0.0, 0.02, 0.0), (3.0, 0.55, 0.75))
PELVIC_POOL = Ellipsoid((0.68, -0.12, 0.0), (0.22, 0.28, 0.5))


@dataclass(frozen=True)
class FollowUp:
    """A follow-up question of a chain and its choices (``None of the above`` is added in training)."""

    question: str
    type: str
    choices: tuple[str, ...]


@dataclass(frozen=True)
class Abnormality:
    """A drawn abnormality: its global label, its chain's root question and follow-ups."""

    label: str
    question: str
    follow_ups: tuple[FollowUp, ...]


ABNORMALITIES: dict[str, tuple[Abnormality, ...]] = {
    ABDOMEN: (
        Abnormality(
            "Kidney stone",
            "Is there a stone in either kidney?",
            (FollowUp("Which kidney contains the stone?", "location", ("Right kidney", "Left kidney")),),
        ),
        Abnormality(
            "Splenomegaly",
            "Is the spleen enlarged?",
            (
                FollowUp(
                    "What is the craniocaudal length of the spleen?",
                    "measurement",
                    ("Less than 12 cm", "12-15 cm", "More than 15 cm"),
                ),
            ),
        ),
        Abnormality(
            "Liver lesion",
            "Is there a focal lesion in the liver?",
            (
                FollowUp(
                    "In which lobe of the liver is the lesion?", "location", ("Right lobe", "Left lobe")
                ),
                FollowUp(
                    "What is the attenuation of the lesion compared with the liver?",
                    "appearance_or_pattern",
                    ("Hypodense", "Isodense", "Hyperdense"),
                ),
            ),
        ),
        Abnormality(
            "Ascites",
            "Is there ascites?",
            (
                FollowUp(
                    "Where is the free fluid?",
                    "location",
                    ("Around the liver and spleen and in the pelvis", "In the pelvis only"),
                ),
            ),
        ),
    ),
    CHEST: (
        Abnormality(
            "Pleural effusion",
            "Is there a pleural effusion?",
            (FollowUp("On which side is the pleural effusion?", "location", ("Right", "Left", "Bilateral")),),
        ),
        Abnormality(
            "Lung nodule",
            "Is there a nodule in the lungs?",
            (FollowUp("Which lung contains the nodule?", "location", ("Right lung", "Left lung")),),
        ),
        Abnormality(
            "Cardiomegaly",
            "Is the heart enlarged?",
            (FollowUp("How severe is the cardiac enlargement?", "severity", tuple(CARDIOMEGALY)),),
        ),
        Abnormality(
            "Emphysema",
            "Is there emphysema?",
            (
                FollowUp(
                    "What is the distribution of the emphysema?",
                    "appearance_or_pattern",
                    ("Upper zone predominant", "Diffuse"),
                ),
            ),
        ),
    ),
}
# Global choices: the drawn labels among labels never drawn; abdominal lists are the longer (> 20,
# the heuristic a third party uses to tell the sources apart), the chest's are CT-RATE's 18.
GLOBAL_CHOICES: dict[str, tuple[str, ...]] = {
    ABDOMEN: (
        "Liver lesion",
        "Kidney stone",
        "Splenomegaly",
        "Ascites",
        "Cholelithiasis",
        "Gallbladder wall thickening",
        "Pancreatic mass",
        "Pancreatic duct dilatation",
        "Adrenal nodule",
        "Hydronephrosis",
        "Renal cyst",
        "Bowel obstruction",
        "Bowel wall thickening",
        "Appendicitis",
        "Diverticulosis",
        "Lymphadenopathy",
        "Abdominal aortic aneurysm",
        "Inguinal hernia",
        "Fatty liver",
        "Portal vein thrombosis",
        "Vertebral fracture",
        "Pneumoperitoneum",
    ),
    CHEST: CTRATE_LABELS,  # the chest cases are CT-RATE volumes
}
# Regions of normal findings, each reported with probability 0.7 (so cases hold different subsets).
NORMAL_FINDINGS: dict[str, dict[str, tuple[str, ...]]] = {
    ABDOMEN: {
        "biliary system": (
            "The gallbladder is unremarkable.",
            "No intra- or extrahepatic biliary dilatation.",
        ),
        "pancreas": ("The pancreas is normal in size and attenuation.", "No pancreatic mass."),
        "lymphatic system": ("No enlarged abdominal lymph nodes.", "No lymphadenopathy."),
        "gastrointestinal tract": (
            "No bowel wall thickening or obstruction.",
            "Bowel loops are unremarkable.",
        ),
        "blood vessels": ("The abdominal aorta is of normal calibre.", "No abdominal aortic aneurysm."),
        "musculoskeletal system": ("No aggressive osseous lesion.", "Mild degenerative change of the spine."),
    },
    CHEST: {
        "respiratory tract": ("The trachea and main bronchi are patent.", "Central airways are patent."),
        "mediastinum": (
            "No mediastinal mass or lymphadenopathy.",
            "Mediastinal structures are unremarkable.",
        ),
        "esophagus": ("The esophagus is unremarkable.", "No esophageal wall thickening."),
        "blood vessels": ("The thoracic aorta is of normal calibre.", "No aortic aneurysm."),
        "musculoskeletal system": (
            "No destructive bone lesion.",
            "Degenerative change of the thoracic spine.",
        ),
        "breast tissue": ("No breast mass is seen.",),
        "diaphragm": ("The diaphragm is intact.",),
    },
}

README = (
    "# FLARE-Task5-MLLM-3D (synthetic miniature)\n\n"
    "A synthetic stand-in for the FLARE 2025 Task 5 release, written by med3dvlm's "
    "`med3dvlm.data.releases.flare.synthetic` in the release's folder and JSON layout: analytic abdomen "
    "(CT-AMOS) and chest (CT-RATE) phantoms as int16 NIfTI in Hounsfield units, with findings, global "
    "and local questions that state only what is drawn in the voxels. It contains no patient data and "
    "is meant for tests and demonstrations, not for training a clinical model.\n"
)

Answers = dict[str, tuple[str, ...] | None]  # abnormality label -> its follow-ups' answers; None: absent


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of one generation run (picklable, shipped to the workers)."""

    seed: int = 0
    slices: int = 32
    size: int = 64


@dataclass
class GenerationSummary:
    """Result of :func:`generate`."""

    out: Path
    annotations: dict[str, list[str]]  # annotation file (relative to ``out``) -> its case ids, in order
    edge_cases: dict[str, str]  # edge case (:data:`EDGE_CASES`) -> the case id holding it
    seconds: float


# ----------------------------------------------------------------------------------------------
# Cases and layout


def source_of(index: int) -> str:
    """``abdomen`` (AMOS) for even indices, ``chest`` (CT-RATE) for odd ones."""
    return ABDOMEN if index % 2 == 0 else CHEST


def split_of(index: int) -> str:
    """``validation`` for ``index % 10`` in {3, 6, 9}, else ``train``."""
    return "validation" if index % 10 in (3, 6, 9) else "train"


def case_id(index: int) -> str:
    """The volume's file name: ``amos_NNNN.nii.gz`` or ``{train,valid}_<pid>_<scan>_<recon>.nii.gz``."""
    if source_of(index) == ABDOMEN:
        return f"amos_{index + 1:04d}.nii.gz"
    prefix = "valid" if split_of(index) == "validation" else "train"
    return f"{prefix}_{index + 1}_{'ab'[index // 4 % 2]}_{1 + index // 2 % 2}.nii.gz"


def volume_dir(index: int) -> str:
    """The folder (relative to the release root) holding case ``index``'s volume."""
    return VALIDATION_DIR if split_of(index) == "validation" else TRAIN_DIRS[source_of(index)]


def annotation_file(index: int) -> str:
    """The JSON (relative to the release root) holding case ``index``'s record."""
    return VALIDATION_JSON if split_of(index) == "validation" else TRAIN_JSONS[source_of(index)]


# ----------------------------------------------------------------------------------------------
# Voxels


def to_disk(volume: np.ndarray) -> np.ndarray:
    """Phantom order ``(z, y, x)`` (z from superior) -> stored order ``(x, y, z)`` (z from inferior, LPS)."""
    return volume[::-1].transpose(2, 1, 0)


def from_disk(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_disk` (on the first three axes)."""
    return array.transpose(2, 1, 0, *range(3, array.ndim))[::-1]


def affine(slices: int, size: int) -> np.ndarray:
    """The LPS affine of the stored ``(x, y, z)`` grid, centred on the world origin."""
    steps = [2.0 * MM_PER_UNIT / (n - 1) for n in (size, size, slices)]
    matrix = np.diag([-steps[0], -steps[1], steps[2], 1.0])
    matrix[:3, 3] = -matrix[:3, :3] @ ((np.array([size, size, slices]) - 1) / 2.0)
    return matrix


def _mask(grid: tuple[np.ndarray, np.ndarray, np.ndarray], shape: Ellipsoid) -> np.ndarray:
    z, y, x = (((g - c) / r) ** 2 for g, c, r in zip(grid, shape.center, shape.radii))
    return z[:, None, None] + y[None, :, None] + x[None, None, :] <= 1.0


def _visible(shape: Ellipsoid, grid: tuple[np.ndarray, ...]) -> Ellipsoid:
    # A radius of sqrt(3)/2 grid steps on every axis always encloses a sample point.
    radii = tuple(max(r, 0.9 * float(g[1] - g[0])) for r, g in zip(shape.radii, grid))
    return replace(shape, radii=radii)


def _scaled(shape: Ellipsoid, factors: float | tuple[float, float, float]) -> Ellipsoid:
    factors = (factors,) * 3 if isinstance(factors, float) else factors
    return replace(shape, radii=tuple(r * f for r, f in zip(shape.radii, factors)))


def _sphere(center: tuple[float, float, float], diameter_mm: float) -> Ellipsoid:
    return Ellipsoid(center, (diameter_mm / 2 / MM_PER_UNIT,) * 3)


def _abdomen(
    rng: np.random.Generator, grid: tuple[np.ndarray, ...], present: dict[str, bool]
) -> tuple[np.ndarray, Answers, dict[str, str]]:
    """The abdomen phantom in HU, the chain answers and the label-bearing findings."""
    shapes = anatomy(rng)
    volume = np.full([len(g) for g in grid], AIR, dtype=np.float32)
    paint(volume, grid, shapes["body"], FAT)
    paint(volume, grid, shapes["muscle"], MUSCLE)
    paint(volume, grid, _CAVITY, VISCERAL_FAT)
    answers: Answers = {}
    spleen, liver = shapes["spleen"], shapes["liver"]
    if present["Splenomegaly"]:
        # Mostly longer: a wider spleen would run into the flank wall.
        spleen = _scaled(spleen, (float(rng.uniform(1.55, 1.7)), 1.3, 1.15))
    length_cm = 2 * spleen.radii[0] * MM_PER_UNIT / 10
    answers["Splenomegaly"] = ("More than 15 cm",) if present["Splenomegaly"] else None
    if present["Ascites"]:
        paint(volume, grid, _scaled(liver, 1.12), FLUID)
        paint(volume, grid, _scaled(spleen, 1.2), FLUID)
        paint(volume, grid, PELVIC_POOL, FLUID)
    answers["Ascites"] = ("Around the liver and spleen and in the pelvis",) if present["Ascites"] else None
    paint(volume, grid, shapes["spine"], BONE)
    for organ in ("aorta", "ivc", "pancreas"):
        paint(volume, grid, shapes[organ], ABDOMEN_HU[organ])
    paint(volume, grid, spleen, ABDOMEN_HU["spleen"])
    paint(volume, grid, liver, ABDOMEN_HU["liver"])
    findings = {"liver": "The liver is normal in size with a smooth contour. No focal lesion."}
    answers["Liver lesion"] = None
    if present["Liver lesion"]:
        side = ("right", "left")[int(rng.integers(2))]
        diameter = int(rng.integers(25, 46))
        offsets = rng.uniform(-0.2, 0.2, size=2)
        center = (
            liver.center[0] + offsets[0] * liver.radii[0],
            liver.center[1] + offsets[1] * liver.radii[1],
            liver.center[2] + (-0.45 if side == "right" else 0.45) * liver.radii[2],  # patient right: x < 0
        )
        paint(volume, grid, _visible(_sphere(center, diameter), grid), int(rng.integers(0, 16)))
        answers["Liver lesion"] = (f"{side.capitalize()} lobe", "Hypodense")
        findings["liver"] = (
            f"A well-defined hypodense lesion measuring {diameter} mm is seen in the {side} lobe."
        )
    stone_side = ("right", "left")[int(rng.integers(2))] if present["Kidney stone"] else None
    for side in ("right", "left"):
        kidney = shapes[f"{side} kidney"]
        paint(volume, grid, kidney, ABDOMEN_HU["kidney"])
        medial = 1.0 if side == "right" else -1.0
        sinus = Ellipsoid(
            (kidney.center[0], kidney.center[1], kidney.center[2] + medial * 0.04),
            (kidney.radii[0] * 0.45, kidney.radii[1] * 0.35, kidney.radii[2] * 0.4),
        )
        paint(volume, grid, sinus, ABDOMEN_HU["renal sinus"])
        if side == stone_side:
            diameter = int(rng.integers(3, 9))
            stone = _visible(_sphere(sinus.center, diameter), grid)
            paint(volume, grid, stone, int(rng.integers(600, 1201)))
            findings["kidneys"] = (
                f"A {diameter} mm calculus is seen in the {side} renal pelvis without hydronephrosis."
            )
    answers["Kidney stone"] = (f"{stone_side.capitalize()} kidney",) if stone_side else None
    findings.setdefault("kidneys", "Both kidneys are normal in size. No calculi or hydronephrosis.")
    findings["spleen"] = (
        f"The spleen is enlarged, measuring {length_cm:.1f} cm craniocaudally, consistent with splenomegaly."
        if present["Splenomegaly"]
        else f"The spleen is normal in size, measuring {length_cm:.1f} cm craniocaudally."
    )
    findings["abdominal cavity and peritoneum"] = (
        "Free fluid is seen around the liver and spleen and in the pelvis, consistent with ascites."
        if present["Ascites"]
        else "No ascites or free air."
    )
    return volume, answers, findings


def _chest(
    rng: np.random.Generator, grid: tuple[np.ndarray, ...], present: dict[str, bool]
) -> tuple[np.ndarray, Answers, dict[str, str]]:
    """The chest phantom in HU, the chain answers and the label-bearing findings."""

    def organ(name: str, shift: float = 0.02, grow: float = 0.05) -> Ellipsoid:
        center, radii = CHEST_ORGANS[name]
        scale = 1.0 + rng.uniform(-grow, grow)
        return Ellipsoid(
            tuple(float(c + rng.uniform(-shift, shift)) for c in center), tuple(r * scale for r in radii)
        )

    volume = np.full([len(g) for g in grid], AIR, dtype=np.float32)
    for name, value in (("body", FAT), ("wall", MUSCLE), ("cavity", VISCERAL_FAT)):
        paint(volume, grid, organ(name, shift=0.0, grow=0.03), value)
    lungs = {side: organ(f"{side} lung") for side in ("right", "left")}
    z, y = grid[0][:, None, None], grid[1][None, :, None]
    emphysema = ("Upper zone predominant", "Diffuse")[int(rng.integers(2))] if present["Emphysema"] else None
    effusion = ("Right", "Left", "Bilateral")[int(rng.integers(3))] if present["Pleural effusion"] else None
    for side, lung in lungs.items():
        inside = _mask(grid, lung)
        volume[inside] = LUNG
        if emphysema:
            volume[inside if emphysema == "Diffuse" else inside & (z < lung.center[0])] = EMPHYSEMA
        if effusion in (side.capitalize(), "Bilateral"):
            volume[inside & (y > lung.center[1] + EFFUSION_FROM * lung.radii[1])] = EFFUSION
    heart = organ("heart")
    grade = tuple(CARDIOMEGALY)[int(rng.integers(2))] if present["Cardiomegaly"] else None
    if grade:
        heart = _scaled(heart, CARDIOMEGALY[grade])
    paint(volume, grid, heart, CHEST_HU["heart"])
    for name in ("aorta", "spine", "trachea"):
        paint(volume, grid, organ(name, shift=0.01, grow=0.0), CHEST_HU[name])
    nodule_side = ("right", "left")[int(rng.integers(2))] if present["Lung nodule"] else None
    lung_text = []
    if nodule_side:
        lung = lungs[nodule_side]
        lateral = -1.0 if nodule_side == "right" else 1.0
        center = (
            lung.center[0] - rng.uniform(0.35, 0.55) * lung.radii[0],
            lung.center[1] - 0.25 * lung.radii[1],
            lung.center[2] + lateral * rng.uniform(0.2, 0.4) * lung.radii[2],
        )
        diameter = int(rng.integers(6, 21))
        paint(volume, grid, _visible(_sphere(center, diameter), grid), CHEST_HU["nodule"])
        lung_text.append(f"A {diameter} mm solid nodule is seen in the upper zone of the {nodule_side} lung.")
    if effusion:
        lung_text.append(
            "Bilateral pleural effusions are present."
            if effusion == "Bilateral"
            else f"A {effusion.lower()} pleural effusion is present."
        )
    if emphysema:
        lung_text.append(
            "Diffuse emphysematous changes are seen in both lungs."
            if emphysema == "Diffuse"
            else "Centrilobular emphysema with upper-zone predominance."
        )
    lung_text.append("No pneumothorax." if lung_text else "The lungs are clear. No pleural effusion.")
    heart_text = f"The heart is {grade.lower()}ly enlarged." if grade else "Heart size is normal."
    answers: Answers = {
        "Pleural effusion": (effusion,) if effusion else None,
        "Lung nodule": (f"{nodule_side.capitalize()} lung",) if nodule_side else None,
        "Cardiomegaly": (grade,) if grade else None,
        "Emphysema": (emphysema,) if emphysema else None,
    }
    findings = {"lungs and pleura": " ".join(lung_text), "heart": f"{heart_text} No pericardial effusion."}
    return volume, answers, findings


def render_case(index: int, config: SyntheticConfig) -> tuple[np.ndarray, Answers, dict[str, str]]:
    """Case ``index``'s int16 HU volume in phantom order ``(z, y, x)``, its chain answers (label ->
    follow-up answers, ``None`` where absent) and its findings (region -> text, in :data:`REGIONS` order)."""
    rng = np.random.default_rng([config.seed, index])
    source = source_of(index)
    present = {a.label: bool(rng.random() < PRESENCE) for a in ABNORMALITIES[source]}
    if index == EDGE_CASES["empty_global_answer"]:
        present = dict.fromkeys(present, False)
    if index == EDGE_CASES["hyphen_in_finding"]:
        present["Liver lesion"] = True  # "well-defined", and a chain with two children to list out of order
    grid = plane_grid("axial", config.slices, config.size)
    volume, answers, findings = (_abdomen if source == ABDOMEN else _chest)(rng, grid, present)
    for region, texts in NORMAL_FINDINGS[source].items():
        pick = texts[int(rng.integers(len(texts)))]
        if rng.random() < 0.7:
            findings[region] = pick
    if index == EDGE_CASES["newline_in_finding"]:
        findings["lungs and pleura"] = findings["lungs and pleura"].replace(". ", ".\n", 1)
    noise = rng.standard_normal(volume.shape, dtype=np.float32) * np.float32(rng.uniform(6.0, 10.0))
    volume = np.clip(np.rint(volume + noise), -1024, 3071).astype(np.int16)
    ordered = (
        {} if index == EDGE_CASES["empty_findings"] else {r: findings[r] for r in REGIONS if r in findings}
    )
    return volume, answers, ordered


# ----------------------------------------------------------------------------------------------
# Records


def local_vqa(source: str, answers: Answers, training: bool, reverse_chain: str | None = None) -> list[dict]:
    """The question chains of a case: per abnormality a "Yes"/"No" root (``follow_up`` -1) and its
    follow-ups (training: choices end with "None of the above", the answer under a "No" root;
    validation: no such option and no follow-ups under a "No" root). Ids run from 1 in list order,
    except that the children of ``reverse_chain``'s root are listed in reverse."""
    items: list[dict] = []
    for abnormality in ABNORMALITIES[source]:
        given = answers[abnormality.label]
        root = len(items) + 1
        items.append(
            {
                "id": root,
                "follow_up": -1,
                "type": "finding_identification",
                "question": abnormality.question,
                "answer": "Yes" if given else "No",
            }
        )
        if not (given or training):
            continue
        children = [
            {
                "id": root + 1 + k,
                "follow_up": root,
                "type": follow_up.type,
                "question": follow_up.question,
                "choices": [*follow_up.choices, NONE_OF_THE_ABOVE] if training else list(follow_up.choices),
                "answer": given[k] if given else NONE_OF_THE_ABOVE,
            }
            for k, follow_up in enumerate(abnormality.follow_ups)
        ]
        items += children[::-1] if abnormality.label == reverse_chain else children
    return items


def _record(index: int, config: SyntheticConfig, answers: Answers, findings: dict[str, str]) -> dict:
    source, training = source_of(index), split_of(index) == "train"
    rng = np.random.default_rng([config.seed, index, 1])  # apart from the voxels' stream
    choices = [GLOBAL_CHOICES[source][i] for i in rng.permutation(len(GLOBAL_CHOICES[source]))]
    chains = (
        []
        if index == EDGE_CASES["empty_local_vqa"]
        else local_vqa(
            source,
            answers,
            training,
            "Liver lesion" if index == EDGE_CASES["children_out_of_order"] else None,
        )
    )
    return {
        "case_id": case_id(index),
        "findings": findings,
        "global_vqa": [
            {
                "question": GLOBAL_QUESTION,
                "choices": choices,
                "answer": [c for c in choices if answers.get(c)],
            }
        ],
        "local_vqa": chains,
    }


def nifti_bytes(data: np.ndarray, matrix: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file of ``data`` (int16, no scaling) with ``matrix`` as qform and sform.

    gzip's header gets mtime 0, so equal arrays give equal bytes."""
    image = nib.Nifti1Image(data, matrix)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(matrix, code=1)
    image.set_sform(matrix, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _write_case(index: int, out: Path, config: SyntheticConfig) -> dict:
    volume, answers, findings = render_case(index, config)
    data = to_disk(volume)
    if index == EDGE_CASES["four_d"]:
        second = np.clip(data.astype(np.int32) + FOUR_D_OFFSET_HU, -1024, 3071).astype(np.int16)
        data = np.stack([data, second], axis=-1)
    with atomic_path(out / volume_dir(index) / case_id(index)) as tmp:
        tmp.write_bytes(nifti_bytes(np.ascontiguousarray(data), affine(config.slices, config.size)))
    return _record(index, config, answers, findings)


_VOLUME_NAME = re.compile(r"(amos_\d+|(train|valid)_\d+_[a-z]_\d+)\.nii\.gz")


def _remove_stale(out: Path, keep: set[str], alt_spelling: bool) -> None:
    for folder in (*TRAIN_DIRS.values(), VALIDATION_DIR):
        for path in (out / folder).glob("*.nii.gz"):
            if _VOLUME_NAME.fullmatch(path.name) and f"{folder}/{path.name}" not in keep:
                path.unlink()
    if not alt_spelling:
        (out / ALT_CHEST_JSON).unlink(missing_ok=True)


def generate(
    out: str | os.PathLike,
    cases: int = 24,
    seed: int = 0,
    slices: int = 32,
    size: int = 64,
    workers: int | None = None,
    alt_spelling: bool = False,
) -> GenerationSummary:
    """Write ``cases`` synthetic cases in the FLARE-Task5-MLLM-3D layout under ``out``.

    Same arguments -> same bytes, whatever ``workers`` is (``None``: all cores, ``0``/``1``: in
    process). Volumes of an earlier run that this run does not write are removed, and so is the
    ``CT-RATE-Tr .json`` copy unless ``alt_spelling``. ``cases`` must hold the edge cases (>= 8).
    """
    if cases < MIN_CASES or slices < 2 or size < 8:
        raise ValueError(
            f"need cases >= {MIN_CASES}, slices >= 2, size >= 8; got {cases=}, {slices=}, {size=}"
        )
    start = time.perf_counter()
    out = Path(out)
    config = SyntheticConfig(seed=seed, slices=slices, size=size)
    work = functools.partial(_write_case, out=out, config=config)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1:
        records = [work(i) for i in range(cases)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            records = list(pool.map(work, range(cases), chunksize=max(1, cases // (4 * workers))))
    annotations: dict[str, list[dict]] = {name: [] for name in (*TRAIN_JSONS.values(), VALIDATION_JSON)}
    for index, record in enumerate(records):
        annotations[annotation_file(index)].append(record)
    if alt_spelling:
        annotations[ALT_CHEST_JSON] = annotations[TRAIN_JSONS[CHEST]]
    for name, items in annotations.items():
        atomic_write_text(out / name, json.dumps(items, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "README.md", README)
    _remove_stale(out, {f"{volume_dir(i)}/{case_id(i)}" for i in range(cases)}, alt_spelling)
    return GenerationSummary(
        out,
        {name: [r["case_id"] for r in items] for name, items in annotations.items()},
        {name: case_id(index) for name, index in EDGE_CASES.items()},
        time.perf_counter() - start,
    )
