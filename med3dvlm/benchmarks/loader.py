"""Loader bench: volume decode rate and training samples/s on one core at 128x256x256.

A few smooth random volumes (gzip compresses them about as well as CT) are written to a temporary
prepared folder in each format; the training figure is the real train loader (caption mixture,
augmentation on, tokenisation, dynamic-padding collate, ``num_workers=0``, one torch thread).
Files are in the page cache, so disk reads are not measured.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from med3dvlm.benchmarks import BenchOptions, BenchRow, median_seconds
from med3dvlm.data.datamodule import M3DDataModule
from med3dvlm.data.volume_io import read_volume, volume_suffix, write_volume
from med3dvlm.models.tiny_qwen import train_tokenizer

SIZE = (128, 256, 256)
REPORT = "The liver shows a hypodense lesion of {} mm in the right lobe. No ascites."
TARGET = 50.0


def smooth_volume(rng: np.random.Generator, size: tuple[int, int, int] = SIZE) -> np.ndarray:
    """Blocky low-frequency structure plus mild noise, in [0, 1]."""
    coarse = rng.random(tuple(s // 8 for s in size), dtype=np.float32)
    volume = coarse.repeat(8, 0).repeat(8, 1).repeat(8, 2)
    volume += rng.normal(0.0, 0.02, size).astype(np.float32)
    return np.clip(volume, 0.0, 1.0)


def write_prepared(root: Path, fmt: str, cases: int, size: tuple[int, int, int] = SIZE) -> Path:
    """A minimal prepared folder (train split only) of ``cases`` volumes and reports."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(cases):
        case = root / "M3D_Cap" / "ct_case" / f"{i:06d}"
        case.mkdir(parents=True, exist_ok=True)
        image = f"M3D_Cap/ct_case/{i:06d}/Axial_portal_venous_phase{volume_suffix(fmt)}"
        write_volume(root / image, smooth_volume(rng, size))
        (case / "text.txt").write_text(REPORT.format(10 + i), encoding="utf-8")
        entries.append({"image": image, "text": f"M3D_Cap/ct_case/{i:06d}/text.txt"})
    (root / "M3D_Cap.json").write_text(json.dumps({"train": entries, "validation": [], "test": []}))
    return root


def train_samples_per_second(root: Path, epochs: int) -> float:
    """Median over epochs of the caption train loader's samples/s (augmentation on, batch 2, in
    process); the median keeps a busy shared machine from dominating the figure."""
    tokenizer = train_tokenizer([REPORT.format(n) for n in range(50)], vocab_size=300)
    datamodule = M3DDataModule(
        root, "caption", tokenizer, num_image_tokens=256, batch_size=2, num_workers=0, spatial_size=SIZE
    )
    loader = datamodule.train_dataloader()
    next(iter(loader))
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _batch in loader:
            pass
        rates.append(len(loader.dataset) / (time.perf_counter() - start))
    return statistics.median(rates)


def run(options: BenchOptions) -> list[BenchRow]:
    quick = options.quick
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cases = 4 if quick else 12
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="med3dvlm-bench-loader-") as tmp:
            for fmt in ("nii.gz", "npy"):
                root = write_prepared(Path(tmp) / fmt.replace(".", "_"), fmt, cases)
                first = next(root.glob(f"M3D_Cap/ct_case/*/*{volume_suffix(fmt)}"))
                decode = median_seconds(lambda first=first: read_volume(first, SIZE), 3 if quick else 5)
                rows.append(
                    BenchRow(
                        "loader",
                        f"decode one {fmt} volume {SIZE} to float32",
                        1.0 / decode,
                        "volumes/s",
                        "1 core",
                    )
                )
                epochs = 1 if fmt == "nii.gz" else 3 if quick else 5
                rate = train_samples_per_second(root, epochs)
                note = "1 core, augmentation on, median of epochs"
                if fmt == "npy":
                    note += f"; target >= {TARGET:g}"
                rows.append(
                    BenchRow(
                        "loader",
                        f"training samples, {fmt} (uint8)" if fmt == "npy" else f"training samples, {fmt}",
                        rate,
                        "samples/s",
                        note,
                    )
                )
    finally:
        torch.set_num_threads(threads)
    return rows
