"""CT-RATE bench (``--only ctrate``): our ``prepare`` of one CT-RATE volume beside CT-CLIP's
preprocessing of the same file, on one core.

The volume is the synthetic CT-RATE's (a chest in HU with noise, v1 storage, 512 x 512 x 300 int16
``.nii.gz``, the size of a CT-RATE volume), in its release tree. CT-CLIP's steps, as its training
loader performs them (``datasets.md`` §2.4): nibabel's ``get_fdata`` (float64), the metadata's
rescale, trilinear ``F.interpolate`` to 1.5 x 0.75 x 0.75 mm, clip to [-1000, 1000], / 1000, centre
crop or pad to 480 x 480 x 240. Ours: ``prepare dataset=ctrate spacing=[1.5,0.75,0.75]
intensity.window=[-1000,1000]`` end to end (read, rescale, resample, window, anti-aliased resize to
128 x 256 x 256, ``.npy`` written and verified, manifest). Where the steps are the same (up to the
resampled, windowed volume) the outputs are compared: ours = (CT-CLIP's + 1) / 2.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from med3dvlm.benchmarks import BenchOptions, BenchRow, paired_seconds
from med3dvlm.data.preparation import prepare_dataset
from med3dvlm.data.preprocess import SourcePreprocessing, resample_to_spacing, scale_intensity
from med3dvlm.data.releases.ctrate import synthetic
from med3dvlm.data.scans import load_scan

TARGET_MM = (1.5, 0.75, 0.75)
WINDOW = (-1000.0, 1000.0)
CTCLIP_SHAPE = (480, 480, 240)  # (x, y, z)
SIZE, SLICES = 512, 300


def ctclip_resampled(
    path: Path,
    slope: float,
    intercept: float,
    z_mm: float,
    xy_mm: float,
    target: tuple[float, ...] = TARGET_MM,
) -> np.ndarray:
    """CT-CLIP's volume up to the crop: ``(x, y, z)`` float32 in [-1, 1] (``target``: mm, z then x, y)."""
    image = nib.load(str(path)).get_fdata()
    image = slope * image + intercept
    tensor = torch.tensor(image.transpose(2, 0, 1))[None, None]
    current = (z_mm, xy_mm, xy_mm)
    size = [int(n * c / t) for n, c, t in zip(tensor.shape[2:], current, target)]
    resampled = F.interpolate(tensor, size=size, mode="trilinear", align_corners=False)[0, 0]
    image = resampled.numpy().transpose(1, 2, 0)
    return (np.clip(image, *WINDOW) / 1000).astype(np.float32)


def ctclip_volume(path: Path, slope: float, intercept: float, z_mm: float, xy_mm: float) -> np.ndarray:
    """CT-CLIP's model input: centre crop or pad (value -1) to 480 x 480 x 240, as ``(z, x, y)``."""
    image = ctclip_resampled(path, slope, intercept, z_mm, xy_mm)
    out = np.full(CTCLIP_SHAPE, -1.0, dtype=np.float32)
    source, target = [], []
    for n, want in zip(image.shape, CTCLIP_SHAPE):
        start, before = max((n - want) // 2, 0), max((want - n) // 2, 0)
        kept = min(n, want)
        source.append(slice(start, start + kept))
        target.append(slice(before, before + kept))
    out[tuple(target)] = image[tuple(source)]
    return out.transpose(2, 0, 1)


def _release(root: Path) -> tuple[Path, dict[str, str]]:
    """A one-volume CT-RATE v1 tree at the release's size; the volume and its metadata row."""
    synthetic.generate(
        root, 1, seed=0, slices=SLICES, size=SIZE, versions=("v1",), radgenome=False, workers=0
    )
    volumes = sorted((root / "dataset" / "train").glob("*/*/*.nii.gz"))
    for extra in volumes[1:]:
        extra.unlink()
    with open(root / "dataset" / "metadata" / "train_metadata.csv", encoding="utf-8") as handle:
        row = next(r for r in csv.DictReader(handle) if r["VolumeName"] == volumes[0].name)
    return volumes[0], row


def run(options: BenchOptions) -> list[BenchRow]:
    repeats = 2 if options.quick else 5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="med3dvlm-bench-ctrate-"))
    try:
        volume, row = _release(work / "raw")
        slope, intercept = float(row["RescaleSlope"]), float(row["RescaleIntercept"])
        z_mm, xy_mm = float(row["ZSpacing"]), float(row["XYSpacing"].strip("[]").split(",")[0])
        runs = iter(range(1_000_000))

        def ours() -> None:
            prepare_dataset(
                work / "raw" / "dataset",
                work / f"out{next(runs)}",
                spatial_size=(128, 256, 256),
                format="npy",
                workers=0,
                progress=False,
                window=WINDOW,
                dataset="ctrate",
                options={"spacing": list(TARGET_MM)},
            )

        original_s, ours_s, ratio = paired_seconds(
            lambda: ctclip_volume(volume, slope, intercept, z_mm, xy_mm), ours, repeats, warmup=1
        )
        scan = load_scan(volume, orientation=None)
        hu = scan.array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        spec = SourcePreprocessing(window=WINDOW, scale="window")
        mine = scale_intensity(resample_to_spacing(hu, scan.spacing, TARGET_MM), spec)
        theirs = (ctclip_resampled(volume, slope, intercept, z_mm, xy_mm).transpose(2, 1, 0) + 1) / 2
        difference = float(np.abs(mine - theirs).max()) if mine.shape == theirs.shape else float("nan")
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    note = f"one {SIZE}x{SIZE}x{SLICES} int16 .nii.gz, one core; original: CT-CLIP's steps"
    return [
        BenchRow("ctrate", "prepare one CT-RATE volume", ours_s, "s", note, original_s, ratio),
        BenchRow(
            "ctrate", "resampled + windowed volume vs CT-CLIP's", difference, "max abs", "in [0, 1] units"
        ),
    ]
